"""Continuous batching of denoising chains on one node.

Each call to :meth:`Executor.step` runs one batched U-Net evaluation for one group (member,
adapter): the largest waiting group, unless a chain has waited ``max_wait`` calls, in which case
its group goes first (throughput without starvation). The batch holds up to ``max_batch`` chains
of that group, oldest first, whatever step each of them is at (per-sample timesteps, prompts and
guidance; a chain whose segment runs without guidance adds one row, not two). Chains join with
:meth:`submit` at any time and leave when they finish, reach ``stop_at`` or reach a segment that
belongs to another node. Chains with different adapters never share a U-Net call: a LoRA changes
the weights, so each adapter is its own group.

Around the U-Net call the batch is handled as tensors, not chain by chain: the inputs are scaled,
the guidance combined and the sampler stepped once per sampler configuration over all its chains
(`Sampler.step_batch`), and the context rows are reused while the batch's chains stay the same. The
per-chain Python that is left is bookkeeping, so the step costs little more than the forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from relaydiff.engine.chain import Chain
from relaydiff.engine.family import Family


class Executor:
    """A queue of chains on one node (``node=None``: this executor runs every segment)."""

    def __init__(self, family: Family, node: str | None = None, max_batch: int = 16, max_wait: int = 8):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait < 1:
            raise ValueError("max_wait must be >= 1")
        self.max_wait = max_wait
        self._waited: dict[int, int] = {}
        self.family = family
        self.node = node
        self.max_batch = max_batch
        self.active: list[Chain] = []
        self.outbox: list[Chain] = []
        self.calls = 0
        self.rows = 0
        # per (member, adapter): the conditioning tensors of the last batch and their concatenation
        self._context: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def submit(self, chain: Chain) -> None:
        if not self._runnable(chain):
            raise ValueError(f"chain {chain.id} has nothing to run on node {self.node!r} at step {chain.step}")
        self.active.append(chain)

    def _runnable(self, chain: Chain) -> bool:
        if chain.done or chain.stopped:
            return False
        return self.node is None or chain.segment.node == self.node

    @property
    def idle(self) -> bool:
        return not self.active

    def step(self) -> int:
        """Run one batched U-Net call; returns the number of chains advanced (0 when idle)."""
        if not self.active:
            return 0
        groups: dict[tuple[str, str | None], list[Chain]] = {}
        for c in self.active:
            groups.setdefault((c.segment.member, c.segment.adapter), []).append(c)
        starved = [c for c in self.active if self._waited.get(c.id, 0) >= self.max_wait]
        if starved:
            key = (starved[0].segment.member, starved[0].segment.adapter)
        else:
            key = max(groups, key=lambda k: len(groups[k]))  # ties: the group seen first (oldest chain)
        batch = groups[key][: self.max_batch]
        self._run_batch(batch, *key)
        ran = {c.id for c in batch}
        still = []
        for c in self.active:
            self._waited[c.id] = 0 if c.id in ran else self._waited.get(c.id, 0) + 1
            if self._runnable(c):
                still.append(c)
            else:
                self.outbox.append(c)
                self._waited.pop(c.id, None)
        self.active = still
        return len(batch)

    def run(self, on_step: Callable[[int], None] | None = None) -> list[Chain]:
        """Step until idle; returns (and clears) the chains that left."""
        while self.active:
            n = self.step()
            if on_step is not None:
                on_step(n)
        return self.drain()

    def drain(self) -> list[Chain]:
        out, self.outbox = self.outbox, []
        return out

    def _context_rows(self, key: tuple, parts: list[torch.Tensor]) -> torch.Tensor:
        """The batch's context rows, concatenated once for as long as the same tensors come in."""
        fam = self.family
        key = (*key, fam.device, fam.dtype)
        cached = self._context.get(key)
        if cached is not None and len(cached[0]) == len(parts) and all(a is b for a, b in zip(cached[0], parts)):
            return cached[1]
        ctx = torch.cat(parts).to(fam.device, fam.dtype)
        self._context[key] = (parts, ctx)  # holding the parts keeps their identities from being reused
        return ctx

    @torch.no_grad()
    def _run_batch(self, batch: list[Chain], member: str, adapter: str | None) -> None:
        fam = self.family
        segments = [c.segment for c in batch]
        guidance = [c.guidance_at(seg) for c, seg in zip(batch, segments)]
        rows = [c.rows_at(seg) for c, seg in zip(batch, segments)]
        x = torch.cat([c.latents for c in batch])
        by_sampler: dict[tuple, list[int]] = {}  # chains whose samplers compute alike, stepped together
        for j, c in enumerate(batch):
            by_sampler.setdefault(c.sampler.batch_key, []).append(j)
        groups = [(batch[js[0]].sampler, js if len(by_sampler) > 1 else None) for js in by_sampler.values()]
        x_in = x
        for sampler, js in groups:
            part = x if js is None else x[js]
            scaled = sampler.scale_model_inputs(part, [batch[j].schedule for j in js or range(len(batch))],
                                                [batch[j].step for j in js or range(len(batch))])
            if js is None:
                x_in = scaled
            elif scaled is not part:
                x_in = x_in.clone() if x_in is x else x_in
                x_in[js] = scaled
        # model rows: (uncond, cond) for a chain with classifier-free guidance, (cond) without
        cond_row, uncond_row, parts, timesteps = [], [], [], []
        for c, n in zip(batch, rows):
            uncond_row.append(len(parts))
            if n == 2:
                parts.append(c.uncond)
            cond_row.append(len(parts))
            parts.append(c.cond)
            timesteps += [c.schedule.values["timesteps"][c.step]] * n
        t_dtype = torch.float32 if any(c.schedule.timesteps.is_floating_point() for c in batch) else torch.int64
        if len(parts) > len(batch):
            x_in = x_in.repeat_interleave(torch.tensor(rows), dim=0)
        t0 = time.perf_counter()
        out = fam.denoise(member, adapter, x_in.to(fam.device, fam.dtype), torch.tensor(timesteps, dtype=t_dtype,
                          device=fam.device), self._context_rows((member, adapter), parts)).float().cpu()
        t1 = time.perf_counter()
        total = out.shape[0]
        self.calls += 1
        self.rows += total
        if total == len(batch):  # no guidance in this batch
            eps = out
        else:  # eps = uncond + g (cond - uncond); a chain without guidance has cond = uncond: its own row
            if total == 2 * len(batch):
                uncond, cond = out[0::2], out[1::2]
            else:
                uncond, cond = out[uncond_row], out[cond_row]
            eps = uncond + torch.tensor(guidance, dtype=out.dtype).view(-1, *(1,) * (out.dim() - 1)) * (cond - uncond)
        x_next, states = [None] * len(batch), [None] * len(batch)
        for sampler, js in groups:
            js = js or list(range(len(batch)))
            chains = [batch[j] for j in js]
            step_x, step_states = sampler.step_batch(
                x if len(js) == len(batch) else x[js], eps if len(js) == len(batch) else eps[js],
                [c.schedule for c in chains], [c.step for c in chains], [c.sampler_state for c in chains],
                [c.generator for c in chains])
            for j, latents, state in zip(js, step_x.split(1), step_states):
                x_next[j], states[j] = latents, state
        for c, seg, n, latents, state in zip(batch, segments, rows, x_next, states):
            c.latents, c.sampler_state = latents, state
            c.accounting.record_step(seg, c.step, n, t0, time.perf_counter(), (t1 - t0) * n / total)
            c.step += 1
