"""Causal language models for the one-shot compression job: loading (the default SmolLM2-135M
included), text corpora and token windows, perplexity and generation, and block-by-block
streaming of checkpoints (:class:`CheckpointReader`, :class:`LayerStream`,
:func:`streaming_perplexity`, :func:`calibrate_blocks` with :class:`UnitStatistics`,
:class:`CheckpointWriter`).

Needs the ``lm`` extra (transformers, accelerate, gguf); transformers is imported lazily.
"""

from __future__ import annotations

from pruning_core.lm.activations import Activations
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.checks import (
    check_causal_lm,
    check_window_length,
    inspect_model,
    max_positions,
    read_config,
    stored_dtype,
)
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
from pruning_core.lm.stream import LayerCall, LayerInputs, LayerStream, calibrate_blocks, streaming_perplexity
from pruning_core.lm.text import (
    SHIPPED_TEXTS,
    calibration_windows,
    evaluation_windows,
    load_text,
    shipped_text_path,
    start_tokens,
    text_windows,
    tokenize_corpus,
)
from pruning_core.lm.unit_stats import UnitInputs, UnitStatistics, combined
from pruning_core.lm.writer import CheckpointWriter, cast_checkpoint

__all__ = [
    "SHIPPED_TEXTS",
    "Activations",
    "CheckpointReader",
    "CheckpointWriter",
    "LayerCall",
    "LayerInputs",
    "LayerStream",
    "UnitInputs",
    "UnitStatistics",
    "combined",
    "calibrate_blocks",
    "calibration_windows",
    "cast_checkpoint",
    "check_causal_lm",
    "check_finite_weights",
    "check_model_dir",
    "check_window_length",
    "default_cache_root",
    "evaluation_windows",
    "generate_text",
    "inspect_model",
    "load_causal_lm",
    "load_text",
    "max_positions",
    "model_fingerprint",
    "perplexity",
    "read_config",
    "resolve_device",
    "save_pretrained_atomic",
    "shipped_text_path",
    "smollm2_dir",
    "start_tokens",
    "stored_dtype",
    "streaming_perplexity",
    "text_windows",
    "tokenize_corpus",
    "window_nll",
]
