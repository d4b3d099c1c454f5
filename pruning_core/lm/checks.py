"""Checks on a model directory made from ``config.json`` and safetensors headers alone.

Stage: inputs. Everything a job can know before reading a weight is checked here, so a bad
model fails in ``prepare`` and not after minutes of work:

- :func:`check_causal_lm`: only decoder-only causal LMs are accepted (a saved BERT would load as
  ``BertLMHeadModel`` and report a bidirectional "perplexity");
- :func:`stored_dtype`: the dtype the checkpoint is stored in (``config.json``'s ``dtype`` /
  ``torch_dtype``, else the dominant floating dtype of the safetensors headers);
- :func:`check_window_length`: windows no longer than ``max_position_embeddings`` / ``n_positions``;
- :func:`inspect_model`: all of the above plus the architecture support of a job
  (:func:`pruning_core.arch.require_architecture`, on a ``meta`` skeleton: no weights read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pruning_core.arch import ArchitectureSupport, Job, require_architecture
from pruning_core.errors import ArtifactError, ConfigError, UnsupportedArchitecture

PathLike = str | os.PathLike[str]
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
# Model types whose config declares ``is_decoder`` although the model is always causal.
ALWAYS_CAUSAL = frozenset({"gpt_neox", "gpt_neox_japanese"})
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def offline_transformers():
    """Import transformers after setting ``HF_HUB_OFFLINE=1`` (process-wide, deliberately: this
    package never downloads; huggingface_hub reads the variable when it is first imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    return transformers


def read_config(path: PathLike) -> Any:
    """The transformers config of a model directory (no weights read, no network).

    Raises:
        UnsupportedArchitecture: transformers does not know the ``model_type``.
        ArtifactError: ``config.json`` is missing or unreadable.
    """
    root = Path(path)
    tf = offline_transformers()
    try:
        return tf.AutoConfig.from_pretrained(root, local_files_only=True)
    except ValueError as exc:
        model_type = _raw_config(root).get("model_type", "?")
        raise UnsupportedArchitecture(str(model_type), f"transformers {tf.__version__} does not know this "
                                      f"model type ({exc})") from exc
    except OSError as exc:
        raise ArtifactError(str(root / "config.json"), f"cannot read the model config ({exc})") from exc


def _raw_config(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(str(root / "config.json"), f"not a readable JSON config ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _declares_is_decoder(config: Any) -> bool:
    return any("is_decoder" in vars(k).get("__annotations__", {}) for k in type(config).__mro__)


def check_causal_lm(config: Any) -> None:
    """Accept only decoder-only causal LMs.

    Rejected: encoder-decoder models; model types without a causal-LM class; checkpoints saved
    as another head (``BertForMaskedLM``, ``LlamaForSequenceClassification``); encoder families
    that are causal only as decoders (``is_decoder`` False: a bidirectional encoder).

    Raises:
        UnsupportedArchitecture: names the saved architecture and the reason.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    model_type = getattr(config, "model_type", None)
    saved = [str(a) for a in (getattr(config, "architectures", None) or [])]
    causal_class = CAUSAL.get(model_type)
    name = saved[0] if saved else causal_class or str(model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitecture(name, "an encoder-decoder model; only decoder-only causal LMs are supported")
    if causal_class is None:
        raise UnsupportedArchitecture(name, f"model_type {model_type!r} has no causal-LM class in transformers; "
                                      "only decoder-only causal LMs are supported")
    heads = [a for a in saved if not a.endswith(CAUSAL_HEADS) and a != causal_class]
    if heads:
        raise UnsupportedArchitecture(name, f"the checkpoint is a {heads} model, not a causal language model "
                                      f"(saved as *{CAUSAL_HEADS[0]} / *{CAUSAL_HEADS[1]})")
    if model_type not in ALWAYS_CAUSAL and _declares_is_decoder(config) and not config.is_decoder:
        raise UnsupportedArchitecture(name, f"a bidirectional encoder (model_type {model_type!r}, is_decoder=False): "
                                      "its 'perplexity' would see future tokens; only causal LMs are supported")


def stored_dtype(path: PathLike) -> torch.dtype:
    """The dtype a checkpoint is stored in: ``config.json``'s ``dtype`` (or ``torch_dtype``), else
    the floating dtype holding most elements in the safetensors headers, else float32."""
    root = Path(path)
    raw = _raw_config(root)
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key)
        if isinstance(value, str) and value in _DTYPES:
            return _DTYPES[value]
    counts: dict[torch.dtype, int] = {}
    for file in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is not None:
                        counts[dtype] = counts.get(dtype, 0) + int(torch.Size(piece.get_shape()).numel())
        except (OSError, SafetensorError) as exc:
            raise ArtifactError(str(file), f"unreadable safetensors header ({exc})") from exc
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def max_positions(config: Any) -> tuple[str, int] | None:
    """``(field, value)`` of the model's longest sequence (``max_position_embeddings``, GPT-2's
    ``n_positions``, ...), or None if the config states none."""
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else config
    for field in POSITION_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return field, value
    return None


def check_window_length(config: Any, length: int, *, field: str = "window_length") -> None:
    """Raise ConfigError(``field``) if windows of ``length`` tokens exceed the model's positions."""
    limit = max_positions(config)
    if limit is not None and length > limit[1]:
        model = (getattr(config, "architectures", None) or [getattr(config, "model_type", "the model")])[0]
        raise ConfigError(field, f"{length} tokens exceed {model}'s {limit[0]} = {limit[1]}; "
                                 f"use windows of at most {limit[1]} tokens")


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect_model` found: the config, the stored dtype and the job's support."""

    config: Any
    dtype: torch.dtype
    support: ArchitectureSupport | None


def inspect_model(path: PathLike, *, job: Job | None = None,
                  window_lengths: Mapping[str, int] | None = None) -> ModelInfo:
    """Every up-front check of a model directory for a job, without reading a weight.

    Args:
        path: a model directory (already checked by :func:`pruning_core.lm.models.check_model_dir`).
        job: ``"oneshot"`` or ``"minitron"`` to check architecture support, or None.
        window_lengths: config field -> window length (e.g. ``{"calibration.window_length": 256}``).

    Raises:
        UnsupportedArchitecture: not a decoder-only causal LM, or the job cannot map the model.
        ConfigError: a window is longer than the model's positions (names the field).
    """
    config = read_config(path)
    check_causal_lm(config)
    for field, length in (window_lengths or {}).items():
        check_window_length(config, length, field=field)
    support = require_architecture(config, job) if job is not None else None
    return ModelInfo(config, stored_dtype(path), support)


__all__ = ["ModelInfo", "check_causal_lm", "offline_transformers", "check_window_length", "inspect_model", "max_positions",
           "read_config", "stored_dtype"]
