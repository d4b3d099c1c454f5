"""Loading and saving Hugging Face causal LMs, with the checks a pruning job needs up front.

Stage: inputs/outputs. :func:`load_causal_lm` validates a model directory before any long work
(it exists, has ``config.json``, its safetensors headers are intact, it is a decoder-only causal
LM (:mod:`pruning_core.lm.checks`, from the config alone), no weight is missing or non-finite),
loads it in the dtype it is stored in unless told otherwise, and never touches the network: every ``from_pretrained`` call passes
``local_files_only=True`` on a local directory, and ``HF_HUB_OFFLINE=1`` is set in the process
environment before transformers is imported here (huggingface_hub reads it once, at import, so
it covers the rest of the process only if nothing imported transformers earlier).
:func:`save_pretrained_atomic` writes a (pruned) model so that a crash never leaves a directory
that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from pruning_core.arch import MODEL_BUILD_LOCK
from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.io.atomic import atomic_dir
from pruning_core.io.manifest import MANIFEST_NAME, Manifest
from pruning_core.io.tensors import check_safetensors
from pruning_core.lm.checks import check_causal_lm, offline_transformers, read_config, stored_dtype
from pruning_core.lm.fingerprint import model_fingerprint
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (CUDA when available) or None (CPU)
    into a :class:`torch.device`.

    Raises:
        ConfigError: an unknown device string, or CUDA requested on a machine without it.
    """
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            "device", f"{spec!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError("device", f"{spec!r} requested but this machine has {count} CUDA device(s)")
    elif device.type not in {"cpu", "mps", "xpu"}:
        raise ConfigError("device", f"{spec!r}: unsupported device type {device.type!r}")
    return device


def check_model_dir(path: str | os.PathLike[str]) -> list[Path]:
    """Fail fast on a directory that cannot hold a loadable model; return its safetensors files.

    Raises:
        ArtifactError: missing directory, no ``config.json``, no ``*.safetensors`` (pickle-only
            checkpoints are refused), or a corrupt safetensors file (names the file).
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(str(root), "model directory does not exist")
    config = root / "config.json"
    if not config.is_file():
        raise ArtifactError(str(root), "not a Hugging Face model directory: no config.json")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(str(config), f"config.json is not valid JSON ({exc})") from exc
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in root.iterdir())
        raise ArtifactError(
            str(root), f"no *.safetensors weights (pickle checkpoints are not loaded); files: {found}"
        )
    for f in files:
        check_safetensors(f)
    return files


def check_finite_weights(model: torch.nn.Module, *, method: str = "load_causal_lm") -> None:
    """Raise :class:`NumericalInstability` naming the first parameter/buffer holding NaN/Inf and its index."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        check_finite(tensor.detach(), method=method, what="weight", layer=name)


def _resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    if path is None or str(path) == DEFAULT_MODEL:
        from pruning_core.lm.smollm2 import smollm2_dir

        return smollm2_dir()
    return Path(path)


def load_causal_lm(
    path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local Hugging Face directory, in eval mode.

    Args:
        path: A model directory (any decoder-only ``AutoModelForCausalLM``), or
            ``"smollm2"`` / None for the default SmolLM2-135M (converted once and cached).
        dtype: Parameter dtype; None (default) loads the dtype the checkpoint is stored in
            (:func:`pruning_core.lm.checks.stored_dtype`: bf16 stays bf16; SmolLM2 is float32).
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ArtifactError: a missing/corrupt directory or file, a missing tokenizer, or weights
            the checkpoint does not provide (they would be silently random-initialized).
        NumericalInstability: a weight holds NaN/Inf (names the parameter and the index).
        UnsupportedArchitecture: not a decoder-only causal LM (checked from ``config.json``
            before the tokenizer or any weight is read; names the architecture).
        ConfigError: an unusable ``device``.
    """
    target = resolve_device(device)
    root = _resolve_model_path(path)
    check_model_dir(root)
    check_causal_lm(read_config(root))
    dtype = dtype if dtype is not None else stored_dtype(root)
    tf = offline_transformers()
    start = time.perf_counter()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(str(root), f"cannot load a tokenizer ({exc})") from exc
    try:
        with MODEL_BUILD_LOCK:
            model, info = tf.AutoModelForCausalLM.from_pretrained(
                root, dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(str(root), f"cannot load the model ({exc})") from exc
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ArtifactError(str(root), f"{len(missing)} weights missing from the checkpoint: {missing[:5]}")
    check_finite_weights(model)
    model = model.to(target).eval()
    logger.info("loaded %s (%s, %s, %s) in %.2f s", root, model.__class__.__name__, dtype, target,
                time.perf_counter() - start)
    return model, tokenizer


def _check_saveable(model: torch.nn.Module) -> None:
    """Refuse models whose saved weights would not be what ``forward`` computes with."""
    from torch.nn.utils import parametrize

    wrapped = [name for name, module in model.named_modules() if parametrize.is_parametrized(module)]
    if wrapped:
        raise ConfigError(
            "model",
            f"{len(wrapped)} modules still carry parametrizations (e.g. '{wrapped[0]}'); fold the masks into "
            "the weights first: torch.nn.utils.parametrize.remove_parametrizations(m, 'weight', leave_parametrized=True)",
        )
    check_finite_weights(model, method="save_pretrained_atomic")


def save_pretrained_atomic(
    model: Any, tokenizer: Any | None, out_dir: str | os.PathLike[str], *, extra: dict[str, Any] | None = None
) -> Path:
    """Save ``model`` (and ``tokenizer``) as a Hugging Face directory that ``from_pretrained`` loads.

    The directory is built beside ``out_dir`` under a temporary name, gets a ``manifest.json``
    with the sha256 of every file (:class:`pruning_core.io.manifest.Manifest`), and is renamed
    into place only when complete; an existing ``out_dir`` is replaced.

    Args:
        model: A ``PreTrainedModel`` (weights are saved as safetensors).
        tokenizer: Its tokenizer, or None.
        out_dir: The final directory.
        extra: Optional JSON-able provenance written to ``pruning_info.json`` inside the directory.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: a module still carries a ``torch.nn.utils.parametrize`` parametrization
            (masks must be folded into the weights, or the saved names would not load).
        NumericalInstability: a weight holds NaN/Inf (names it); nothing is written.
    """
    _check_saveable(model)
    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "pruning_info.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        manifest = Manifest(tmp)
        for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
            manifest.record(f.relative_to(tmp).as_posix(), f, kind="model-file")
    logger.info("saved model to %s", final)
    return final


__all__ = [
    "DEFAULT_MODEL",
    "check_finite_weights",
    "check_model_dir",
    "load_causal_lm",
    "model_fingerprint",
    "resolve_device",
    "save_pretrained_atomic",
]
