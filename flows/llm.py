"""What every LLM job shares: the model directory, token windows, and the perplexity task.

- :func:`prepare_windows` cuts the calibration and evaluation windows (plus optional extra
  windows disjoint from the first calibration windows) and records them in the run directory;
  each job's first task calls it once its own checks have passed.
- :func:`evaluate_perplexity` (a task) measures a model directory's perplexity on the run's
  evaluation windows. The dense model's value is cached by (model content hash, evaluation
  windows hash, how it was computed) under the cache root, so any job on the same model and
  evaluation reuses it (:mod:`flows.cache`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task

from flows.cache import ResultCache, digest
from flows.config import CalibrationConfig, EvaluationConfig
from flows.execution import IO_TASK
from flows.hub import resolve_model
from pruning_core.errors import ArtifactError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.io.tensors import load_tensors, save_tensors
from pruning_core.lm import (
    calibration_windows,
    cast_checkpoint,
    evaluation_windows,
    load_causal_lm,
    load_text,
    model_fingerprint,
    resolve_device,
    smollm2_dir,
    start_tokens,
    stored_dtype,
    streaming_perplexity,
    tokenize_corpus,
)
from pruning_core.lm.checks import offline_transformers
from pruning_core.lm.models import check_model_dir
from pruning_core.lm.speed import available_memory, checkpoint_bytes, compare_model_dirs
from pruning_core.minitron import disjoint_windows

log = logging.getLogger(__name__)
# transformers' from_pretrained swaps torch.nn.init functions process-wide while it loads; two
# threads loading at once can leave them swapped. Loads in this process take turns.
_LOAD_LOCK = threading.Lock()
DENSE_PERPLEXITY = "perplexity"  # the result cache's namespace of dense models' perplexities


def model_dir(model: str, revision: str | None = None) -> str:
    """The absolute model directory a job's ``model`` names: ``smollm2`` (the shipped SmolLM2-135M),
    a directory, or a Hugging Face hub id (``org/name``) at ``revision`` in the local hub cache
    (:func:`flows.hub.resolve_model`).

    Raises:
        ConfigError: a hub id or revision that is not in the cache (nothing downloads: ``HF_HUB_OFFLINE=1``).
    """
    if model == "smollm2":
        return str(smollm2_dir().resolve())
    return str(resolve_model(model, revision))


def input_model(job: Any, run_dir: str) -> str:
    """The model directory an LLM job reads: its ``model`` at ``revision`` (:func:`model_dir`), or,
    when ``dtype`` names another dtype than the one it is stored in, that model cast into the run
    directory (``input-model/``: written once, one tensor in memory at a time, recorded in the
    manifest), so every stage (statistics, pruning, the output's dtype, both perplexities, the
    dense-perplexity cache, a recovery teacher) sees the model in the requested dtype.

    Raises:
        NumericalInstability: a weight overflows the requested dtype (float32 beyond float16's range).
    """
    source = model_dir(job.model, job.revision)
    if job.dtype == "auto" or stored_dtype(source) == getattr(torch, job.dtype):
        return source
    out = paths.input_model(run_dir)
    if not Manifest(run_dir).is_complete("input-model"):
        log.info("casting %s from %s to %s into %s", source, stored_dtype(source), job.dtype, out)
        cast_checkpoint(source, out, getattr(torch, job.dtype), key=job.job_hash())
        Manifest(run_dir).record("input-model", out, kind="model")
    return str(out)


def load_model(directory: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a model directory (checked: files, shapes, NaN/Inf), one load at a time."""
    with _LOAD_LOCK:
        return load_causal_lm(directory, device=device)


def load_tokenizer(directory: str) -> Any:
    """The tokenizer of a model directory, without loading the weights."""
    root = Path(directory)
    check_model_dir(root)
    try:
        return offline_transformers().AutoTokenizer.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(str(root), f"cannot load a tokenizer ({exc})") from exc


@dataclass(frozen=True)
class DisjointWindows:
    """Extra windows of the calibration text sharing no token with its first ``avoid`` windows."""

    name: str
    count: int
    seed: int
    avoid: int


def _cut(tokenizer: Any, calibration: CalibrationConfig, evaluation: EvaluationConfig,
         extra: DisjointWindows | None) -> dict[str, torch.Tensor]:
    cal, ev, start = calibration, evaluation, start_tokens(tokenizer)
    tokens = tokenize_corpus(tokenizer, load_text(cal.text, field=cal.text_field))
    windows = {"calibration": calibration_windows(tokens, cal.num_windows, cal.window_length, cal.seed, start=start,
                                                  what=f"calibration text '{cal.text}'")}
    if extra is not None:
        windows[extra.name] = disjoint_windows(tokens, extra.count, cal.window_length, extra.seed,
                                               avoid=windows["calibration"][: extra.avoid])
    if ev.enabled:
        ev_tokens = tokenize_corpus(tokenizer, load_text(ev.text, field=ev.text_field))
        windows["evaluation"] = evaluation_windows(ev_tokens, ev.num_windows, ev.window_length, start=start,
                                                   what=f"evaluation text '{ev.text}'")
    return windows


def prepare_windows(run_dir: str, tokenizer: Any, calibration: CalibrationConfig, evaluation: EvaluationConfig,
                    *, extra: DisjointWindows | None = None) -> None:
    """Tokenize the texts, cut the windows (``[n, length]`` int64) and record them in the run
    directory (``windows.safetensors``); nothing if they are recorded already. Every calibration
    and evaluation window begins with the tokens the tokenizer puts before a text (BOS: Gemma,
    Llama 3, ...); a tokenizer that adds none (SmolLM2) gets the plain windows.

    Raises:
        ConfigError: a text too short for the requested windows (names the text).
    """
    if Manifest(run_dir).is_complete("windows"):
        return
    save_tensors(paths.windows(run_dir), _cut(tokenizer, calibration, evaluation, extra))
    Manifest(run_dir).record("windows", paths.windows(run_dir), kind="tokens")


def load_windows(run_dir: str, which: str) -> torch.Tensor:
    """The run's ``which`` windows (calibration, evaluation, distillation): ``[n, length]`` int64."""
    return load_tensors(paths.windows(run_dir), [which])[which]


def window_batches(run_dir: str, which: str, batch_size: int, *, count: int | None = None,
                   device: torch.device | None = None) -> list[torch.Tensor]:
    """The first ``count`` windows of ``which`` (all if None) in batches of ``batch_size``, on ``device``."""
    windows = load_windows(run_dir, which)[:count]
    return [b.to(device) if device is not None else b for b in windows.split(batch_size)]


def _windows_sha256(windows: torch.Tensor) -> str:
    data = windows.contiguous().cpu()
    head = f"{data.dtype} {list(data.shape)}\n".encode()
    return hashlib.sha256(head + data.numpy().tobytes()).hexdigest()


def dense_perplexity_key(model: str, windows: torch.Tensor, batch_size: int, device: str) -> str:
    """The cache key of a model directory's perplexity on ``windows``: its content hash, the windows'
    hash, and what could change the printed digits (batch size, device type, torch and transformers)."""
    kind = resolve_device(device).type
    dtype = "float32" if kind == "cpu" else str(stored_dtype(model)).removeprefix("torch.")
    return digest({"model": model_fingerprint(model), "windows": _windows_sha256(windows), "batch_size": batch_size,
                   "device": kind, "dtype": dtype, "torch": torch.__version__,
                   "transformers": importlib.metadata.version("transformers")})


def _measure(model: str, windows: torch.Tensor, batch_size: int, device: str) -> float:
    """Streamed block by block (one decoder block in memory): float32 on CPU, the stored dtype on CUDA."""
    return streaming_perplexity(model, windows, batch_size=batch_size, device=device)


def _cached_measure(model: str, windows: torch.Tensor, batch_size: int, device: str) -> tuple[float, bool]:
    """The perplexity from the cache if a valid entry exists, else measured and stored; (value, hit)."""
    cache, key = ResultCache(DENSE_PERPLEXITY), dense_perplexity_key(model, windows, batch_size, device)
    entry = cache.get(key)
    value = entry.get("perplexity") if entry else None
    if isinstance(value, float) and math.isfinite(value) and value >= 1.0:
        log.info("dense perplexity %.4f from the cache (%s)", value, key[:12])
        return value, True
    value = _measure(model, windows, batch_size, device)
    cache.put(key, {"perplexity": value, "model_dir": model})
    return value, False


@task(name="evaluate", task_run_name="evaluate-perplexity-{which}", **IO_TASK)
def evaluate_perplexity(run_dir: str, model: str, which: str, evaluation: EvaluationConfig, device: str,
                        *, cached: bool = False) -> float:
    """Perplexity of the model in directory ``model`` on the run's evaluation windows, recorded as
    ``perplexity_<which>.json`` (``which``: before or after pruning).

    With ``cached`` (the dense model) the value comes from the result cache when the same model
    content was measured on the same windows before, and is stored there otherwise.
    """
    out, key = paths.perplexity(run_dir, which), f"perplexity_{which}"
    if Manifest(run_dir).is_complete(key):
        return float(json.loads(out.read_text())["perplexity"])
    windows, hit = load_windows(run_dir, "evaluation"), False
    if cached:
        ppl, hit = _cached_measure(model, windows, evaluation.batch_size, device)
    else:
        ppl = _measure(model, windows, evaluation.batch_size, device)
    atomic_write_text(out, json.dumps({"perplexity": ppl, "model_dir": model, "from_cache": hit}))
    Manifest(run_dir).record(key, out, kind="metric")
    return ppl


@task(name="measure-speed", **IO_TASK)
def measure_speed(run_dir: str, dense_dir: str, output_dir: str, device: str, note: str) -> dict[str, Any]:
    """Prefill/decode tokens/s of the dense and the output model, alternated in this process (a
    short prompt, median of 3), with ``note`` saying what to expect (``speed.json``, resumable).

    Inference needs both models whole and at once: the only stage of a job whose memory grows
    with the model. It is skipped (``{"skipped": reason}``, and a warning) when their stored bytes
    exceed half of the available memory; ``evaluation.speed: false`` turns it off."""
    out = paths.speed(run_dir)
    if Manifest(run_dir).is_complete("speed"):
        return json.loads(out.read_text())
    needed, available = checkpoint_bytes(dense_dir) + checkpoint_bytes(output_dir), available_memory()
    if available is not None and needed > available // 2:  # inference needs both models whole, at once
        result = {"skipped": f"the dense and the output model need {needed / 2**30:.1f} GiB loaded together; "
                             f"{available / 2**30:.1f} GiB available (the limit is half of it)"}
        log.warning("speed not measured: %s", result["skipped"])
    else:
        result = compare_model_dirs(dense_dir, output_dir, device=str(resolve_device(device)),
                                    prompt_tokens=32, decode_tokens=8, repeats=3, warmup=1)
        result["note"] = note
    atomic_write_text(out, json.dumps(result, indent=1))
    Manifest(run_dir).record("speed", out, kind="json")
    return result


def speed_stage(run: Any, job: Any, dense_dir: str, output_dir: str, note: str) -> dict[str, Any] | None:
    """The ``speed`` stage of every LLM job (:func:`measure_speed`; ratios logged to MLflow as
    ``prefill_speed_ratio``/``decode_speed_ratio``); None when ``evaluation.speed`` is off."""
    if not job.evaluation.speed:
        return None
    with run.stage("speed"):
        speed = measure_speed(run.dir, dense_dir, output_dir, job.device, note)
    if "prefill_ratio" in speed:  # not when skipped for memory
        run.log_metrics({"prefill_speed_ratio": speed["prefill_ratio"], "decode_speed_ratio": speed["decode_ratio"]})
    return speed


def model_sizes(input_dir: str, output_dir: str) -> dict[str, Any]:
    """Bytes on disk of the input's and the output's weight files (``*.safetensors``), and their ratio."""
    size = {"input_bytes": checkpoint_bytes(input_dir), "output_bytes": checkpoint_bytes(output_dir)}
    size["ratio"] = size["output_bytes"] / size["input_bytes"] if size["input_bytes"] else None
    return size


def evaluate_dense_stage(run: Any, job: Any, model_dir: str) -> float | None:
    """The dense-perplexity stage of every LLM job (``run``: a :class:`flows.runtime.JobRun`): measured
    once per model content and evaluation windows, then from the cache; None when evaluation is off."""
    if not job.evaluation.enabled:
        return None
    with run.stage("evaluate_dense"):
        value = evaluate_perplexity(run.dir, model_dir, "before", job.evaluation, job.device, cached=True)
    run.log_metrics({"perplexity_before": value})
    return value


__all__ = ["DisjointWindows", "evaluate_dense_stage", "dense_perplexity_key", "evaluate_perplexity", "input_model",
           "load_model", "load_tokenizer", "load_windows", "measure_speed", "model_dir", "model_sizes", "prepare_windows",
           "speed_stage", "window_batches"]
