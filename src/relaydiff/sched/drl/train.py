"""Training of the DRL + convex solver's policy: MaskablePPO on the round MDP, read top to bottom.

The policy (sb3-contrib's MaskablePPO on :class:`relaydiff.sim.round_env.OffloadRoundEnv`) starts
from an imitation warm start (``bc_rounds`` > 0): the actor is fitted to a teacher's choices (by
default the option the local-search solution gives the visited user) and the critic to the returns;
then PPO fine-tunes both on the exact-objective reward. Every ``checkpoint_every`` steps the actor
is exported to numpy (:class:`relaydiff.sched.drl.policy.NumpyPolicy`) and validated (objective /
greedy's on fixed rounds); the best is kept. ``bc_rounds=0`` is pure PPO. Checkpoints are
safetensors + JSON (no pickle): the policy/value weights, the Adam state and the step counter,
which is all a resume needs. Every hyperparameter is in :class:`DRLConfig`.

Domain randomization (issue 18): with ``families`` set, every episode, imitation round and
validation round is drawn from one of those families (:mod:`relaydiff.sim.families`); the shipped
policy is trained on :data:`relaydiff.sim.families.TRAINING_FAMILIES` and the bench reports the
other families as held out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from safetensors.torch import load_file, save_file
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from relaydiff.sched.baselines import greedy, local_search_options
from relaydiff.sched.drl.policy import NumpyPolicy, PolicyError, solve_drl
from relaydiff.sim.families import get_families
from relaydiff.sim.round_env import OffloadRoundEnv, RoundEnvConfig
from relaydiff.system.problem import RoundInstance, sample_instance
from relaydiff.system.scenario import load_scenario


@dataclass(frozen=True)
class DRLConfig:
    """Every hyperparameter of ``relaydiff train offload`` (MaskablePPO on the round MDP)."""

    scenario: str = "default,congested"  # comma-separated: each training round picks one
    families: str = ""  # comma-separated family names (relaydiff.sim.families): each round draws one; replaces scenario
    n_min: int = 3  # users per training round, log-uniform in [n_min, n_max]
    n_max: int = 300
    seed: int = 0
    total_timesteps: int = 250_000
    n_envs: int = 4
    n_steps: int = 512  # rollout length per env
    batch_size: int = 256
    n_epochs: int = 5
    learning_rate: float = 1e-4  # fine-tuning the imitation warm start; 3e-4 for pure PPO
    gamma: float = 1.0  # the return is exactly the objective gain of the round
    gae_lambda: float = 0.95
    clip_range: float = 0.1
    ent_coef: float = 0.001
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (64, 64)
    bc_rounds: int = 3000  # > 0: before PPO, imitate the teacher on this many rounds (0 = pure PPO)
    bc_epochs: int = 30
    bc_teacher: str = "local_search"  # "greedy" (best immediate gain) or "local_search" (the option the local-search solution gives)
    bc_learning_rate: float = 1e-3
    checkpoint_every: int = 25_000  # timesteps between checkpoints and validations
    val_rounds: int = 24  # validation rounds per checkpoint (fixed seed), scored against greedy
    val_sizes: tuple[int, ...] = (10, 30, 100)
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("n_min", "total_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "checkpoint_every", "val_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"DRLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_min > self.n_max:
            raise ValueError(f"DRLConfig: n_min={self.n_min} exceeds n_max={self.n_max}")
        if self.bc_teacher not in ("greedy", "local_search"):
            raise ValueError(f"DRLConfig.bc_teacher must be 'greedy' or 'local_search', got {self.bc_teacher!r}")
        if not self.net_arch or min(self.net_arch) < 1:
            raise ValueError(f"DRLConfig.net_arch must be positive layer widths, got {self.net_arch}")
        self.env_config()  # unknown scenario fields or family names fail here

    def env_config(self) -> RoundEnvConfig:
        """The rounds training draws (episodes, imitation and validation alike)."""
        return RoundEnvConfig(scenario=self.scenario, n_min=self.n_min, n_max=self.n_max, families=self.families)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DRLConfig":
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"DRLConfig: unknown fields {sorted(unknown)}")
        for key in ("net_arch", "val_sizes"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def policy_from_sb3(model: Any, meta: dict[str, Any] | None = None) -> NumpyPolicy:
    """Export the actor of a MaskablePPO MlpPolicy (policy_net + action_net) to numpy."""
    layers = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    layers.append(model.policy.action_net)
    acts = {type(m).__name__ for m in model.policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)}
    if acts != {"Tanh"}:
        raise PolicyError(f"only tanh MLPs export to numpy, got activations {sorted(acts)}")
    ws = [m.weight.detach().cpu().numpy().astype(np.float64) for m in layers]
    bs = [m.bias.detach().cpu().numpy().astype(np.float64) for m in layers]
    return NumpyPolicy(ws, bs, int(model.action_space.n) - 1, dict(meta or {}))


def imitation_data(cfg: DRLConfig, rounds: int, seed: int) -> dict[str, np.ndarray]:
    """(obs, mask, teacher action, return-to-go) on rounds drawn like the training env's.

    The greedy teacher takes the best immediate gain; the local-search teacher gives each visited
    user its option in the local-search solution of the round (greedy where that option is masked).
    """
    env = OffloadRoundEnv(cfg.env_config())
    obs, masks, acts, rtg = [], [], [], []
    for r in range(rounds):
        env.reset(seed=seed + r)
        rnd = env.round
        target = local_search_options(rnd.instance)[0] if cfg.bc_teacher == "local_search" else None
        rewards = []
        while not rnd.done:
            mask = rnd.mask()
            a = rnd.greedy_option()
            if target is not None and mask[target[rnd.user]]:
                a = int(target[rnd.user])
            obs.append(rnd.observation()), masks.append(mask.copy()), acts.append(a)
            rewards.append(rnd.step(a))
        rtg += list(np.cumsum(rewards[::-1])[::-1])
    return {"obs": np.array(obs, dtype=np.float32), "mask": np.array(masks), "action": np.array(acts),
            "return": np.array(rtg, dtype=np.float32)}


def imitate(model: Any, data: dict[str, np.ndarray], cfg: DRLConfig) -> dict[str, float]:
    """Warm start: fit the actor to the greedy choice (masked cross-entropy) and the critic to its returns."""
    pol = model.policy
    opt = torch.optim.Adam(pol.parameters(), lr=cfg.bc_learning_rate)
    x = torch.as_tensor(data["obs"])
    m = torch.as_tensor(data["mask"])
    a = torch.as_tensor(data["action"])
    ret = torch.as_tensor(data["return"])
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    for _ in range(cfg.bc_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            feats = pol.extract_features(x[idx])
            lat_pi, lat_vf = pol.mlp_extractor(feats)
            logits = pol.action_net(lat_pi).masked_fill(~m[idx], -1e8)
            loss = torch.nn.functional.cross_entropy(logits, a[idx])
            loss = loss + torch.nn.functional.mse_loss(pol.value_net(lat_vf).squeeze(-1), ret[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        lat_pi, _ = pol.mlp_extractor(pol.extract_features(x))
        agree = (pol.action_net(lat_pi).masked_fill(~m, -1e8).argmax(-1) == a).float().mean().item()
    return {"bc_samples": int(n), "bc_agreement": float(agree)}


def _validation_set(cfg: DRLConfig) -> list[RoundInstance]:
    """Fixed rounds of every training scenario or family at every validation size."""
    env_cfg = cfg.env_config()
    rng = np.random.default_rng(10_000 + cfg.seed)
    if env_cfg.family_names:
        fams = get_families(env_cfg.family_names)
        per = max(cfg.val_rounds // (len(cfg.val_sizes) * len(fams)), 1)
        return [f.sample(sc, n, rng) for f, sc in ((f, f.scenario()) for f in fams) for n in cfg.val_sizes for _ in range(per)]
    scs = [load_scenario(s) for s in env_cfg.scenarios]
    per = max(cfg.val_rounds // (len(cfg.val_sizes) * len(scs)), 1)
    return [sample_instance(sc, n_users=n, seed=rng) for sc in scs for n in cfg.val_sizes for _ in range(per)]


def validate(policy: NumpyPolicy, instances: list[RoundInstance]) -> dict[str, float]:
    """Mean and min of the policy's objective / the greedy baseline's, over fixed rounds."""
    r = np.array([solve_drl(inst, policy).objective / greedy(inst).objective for inst in instances])
    return {"vs_greedy_mean": float(r.mean()), "vs_greedy_min": float(r.min())}


def _save_checkpoint(model: Any, cfg: DRLConfig, ckpt_dir: Path, extra: dict[str, Any]) -> None:
    """Policy + value weights and the Adam state as safetensors, counters as JSON (no pickle)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()}
    opt = model.policy.optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(float(val))
            tensors[f"adam.{pid}.{name}"] = t.detach().cpu().contiguous().reshape(t.shape)
    tmp = ckpt_dir / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt_dir / "checkpoint.safetensors")
    meta = {"num_timesteps": int(model.num_timesteps), "config": asdict(cfg),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]], **extra}
    (ckpt_dir / "checkpoint.json").write_text(json.dumps(meta, indent=2))


def _load_checkpoint(model: Any, ckpt_dir: Path) -> dict[str, Any]:
    meta = json.loads((ckpt_dir / "checkpoint.json").read_text())
    tensors = load_file(str(ckpt_dir / "checkpoint.safetensors"))
    model.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    opt = model.policy.optimizer
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("adam."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val
    sd["state"] = state
    for g, saved in zip(sd["param_groups"], meta["param_groups"]):
        g.update(saved)
    opt.load_state_dict(sd)
    model.num_timesteps = int(meta["num_timesteps"])
    return meta


def train(
    cfg: DRLConfig,
    out_dir: str | Path,
    resume: bool = False,
    on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train MaskablePPO on the round MDP; checkpoint and validate every ``checkpoint_every`` steps.

    Writes ``out_dir/checkpoint.*`` (resumable), ``out_dir/best.*`` (the numpy policy with the best
    validation score) and ``out_dir/history.json``; returns the last record.
    """
    torch.set_num_threads(cfg.torch_threads)
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    if not resume and (ckpt / "checkpoint.json").exists():
        raise FileExistsError(f"{ckpt} holds a checkpoint: pass resume=True (--resume) or use another output folder")
    if resume:
        if not (ckpt / "checkpoint.json").exists():
            raise FileNotFoundError(f"no checkpoint to resume in {ckpt}")
        saved = asdict(DRLConfig.from_dict(json.loads((ckpt / "checkpoint.json").read_text())["config"]))
        diff = sorted(k for k, v in asdict(cfg).items() if k != "total_timesteps" and saved[k] != v)
        if diff:
            raise ValueError(f"resume: the checkpoint was trained with other values of {diff}; pass the same config")

    env_cfg = cfg.env_config()
    venv = DummyVecEnv([lambda: OffloadRoundEnv(env_cfg) for _ in range(cfg.n_envs)])
    model = MaskablePPO(
        "MlpPolicy", venv, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, device="cpu",
        policy_kwargs={"net_arch": {"pi": list(cfg.net_arch), "vf": list(cfg.net_arch)}, "activation_fn": torch.nn.Tanh},
    )
    history: list[dict[str, Any]] = []
    best_score = -np.inf
    if resume:
        meta = _load_checkpoint(model, ckpt)
        history = meta.get("history", [])
        best_score = float(meta.get("best_score", -np.inf))
    val = _validation_set(cfg)
    if cfg.bc_rounds > 0 and not resume:
        rec = {"timesteps": 0, **imitate(model, imitation_data(cfg, cfg.bc_rounds, 20_000 + cfg.seed), cfg)}
        policy = policy_from_sb3(model)
        rec.update(validate(policy, val))
        history.append(rec)
        best_score = rec["vs_greedy_mean"]
        policy.meta = {"trained_timesteps": 0, "config": asdict(cfg), "validation": rec}
        policy.save_pretrained(out / "best")
        if on_progress is not None:
            on_progress(0, cfg.total_timesteps, rec)
    venv.seed(cfg.seed + model.num_timesteps)  # a resumed run draws fresh, still seeded, rounds

    class _Progress(BaseCallback):
        def _on_step(self) -> bool:
            if on_progress is not None:
                on_progress(self.num_timesteps, cfg.total_timesteps, {})
            return True

    cb = _Progress()
    while model.num_timesteps < cfg.total_timesteps:
        chunk = min(cfg.checkpoint_every, cfg.total_timesteps - model.num_timesteps)
        t0 = time.perf_counter()
        model.learn(total_timesteps=chunk, reset_num_timesteps=False, callback=cb)
        policy = policy_from_sb3(model)
        score = validate(policy, val)
        rec = {"timesteps": int(model.num_timesteps), "wall_s": time.perf_counter() - t0, **score}
        history.append(rec)
        if score["vs_greedy_mean"] > best_score:
            best_score = score["vs_greedy_mean"]
            policy.meta = {"trained_timesteps": int(model.num_timesteps), "config": asdict(cfg), "validation": score}
            policy.save_pretrained(out / "best")
        _save_checkpoint(model, cfg, ckpt, {"history": history, "best_score": best_score})
        (out / "history.json").write_text(json.dumps(history, indent=2))
        if on_progress is not None:
            on_progress(int(model.num_timesteps), cfg.total_timesteps, rec)
    return history[-1] if history else {}
