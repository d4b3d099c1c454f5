"""Causal language models for the one-shot compression job: loading (the default SmolLM2-135M
included), text corpora and token windows, perplexity and generation.

Needs the ``lm`` extra (transformers, accelerate, gguf); transformers is imported lazily.
"""

from __future__ import annotations

from pruning_core.lm.evaluate import generate_text, perplexity, window_nll
from pruning_core.lm.models import (
    check_finite_weights,
    check_model_dir,
    load_causal_lm,
    model_fingerprint,
    resolve_device,
    save_pretrained_atomic,
)
from pruning_core.lm.smollm2 import default_cache_root, smollm2_dir
from pruning_core.lm.text import (
    SHIPPED_TEXTS,
    calibration_windows,
    evaluation_windows,
    load_text,
    shipped_text_path,
    tokenize_corpus,
)

__all__ = [
    "SHIPPED_TEXTS",
    "calibration_windows",
    "check_finite_weights",
    "check_model_dir",
    "default_cache_root",
    "evaluation_windows",
    "generate_text",
    "load_causal_lm",
    "load_text",
    "model_fingerprint",
    "perplexity",
    "resolve_device",
    "save_pretrained_atomic",
    "shipped_text_path",
    "smollm2_dir",
    "tokenize_corpus",
    "window_nll",
]
