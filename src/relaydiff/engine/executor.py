"""Continuous batching of denoising chains on one node.

Each call to :meth:`Executor.step` runs one batched U-Net evaluation for one group (member,
adapter): the largest waiting group, unless a chain has waited ``max_wait`` calls, in which case
its group goes first (throughput without starvation). The batch holds up to ``max_batch`` chains
of that group, oldest first, whatever step each of them is at (per-sample timesteps, prompts and
guidance; a chain whose segment runs without guidance adds one row, not two). Chains join with
:meth:`submit` at any time and leave when they finish, reach ``stop_at`` or reach a segment that
belongs to another node. Chains with different adapters never share a U-Net call: a LoRA changes
the weights, so each adapter is its own group.
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

    @torch.no_grad()
    def _run_batch(self, batch: list[Chain], member: str, adapter: str | None) -> None:
        fam = self.family
        dtype, device = fam.dtype, fam.device
        xs, ts, ctx = [], [], []
        for c in batch:
            x_in = c.sampler.scale_model_input(c.latents, c.schedule, c.step)
            t = c.schedule.timesteps[c.step]
            if c.uses_cfg:
                xs += [x_in, x_in]
                ts += [t, t]
                ctx += [c.uncond, c.cond]
            else:
                xs.append(x_in)
                ts.append(t)
                ctx.append(c.cond)
        t0 = time.perf_counter()
        out = fam.denoise(member, adapter, torch.cat(xs).to(device, dtype), torch.stack(ts).to(device),
                          torch.cat(ctx).to(device, dtype)).float().cpu()
        t1 = time.perf_counter()
        rows = out.shape[0]
        self.calls += 1
        self.rows += rows
        i = 0
        for c in batch:
            seg = c.segment
            if c.uses_cfg:
                uncond, cond = out[i:i + 1], out[i + 1:i + 2]
                eps = uncond + c.guidance * (cond - uncond)
                i += 2
            else:
                eps = out[i:i + 1]
                i += 1
            c.latents, c.sampler_state = c.sampler.step(c.latents, eps, c.schedule, c.step, c.sampler_state,
                                                        c.generator)
            c.accounting.record_step(seg, c.step, c.rows, t0, time.perf_counter(), (t1 - t0) * c.rows / rows)
            c.step += 1
