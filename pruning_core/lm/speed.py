"""Measured inference speed of a causal LM: prefill and decode tokens per second (median of repeats).

Stage: outputs (measurement). What a pruned model buys at inference, measured rather than
assumed: a prompt of ``prompt_tokens`` runs through the model once (prefill, filling the KV
cache), then ``decode_tokens`` tokens are generated greedily one at a time with the cache
(decode). Each repeat times both phases with ``time.perf_counter`` after ``warmup`` untimed
runs; the medians are reported. :func:`compare_speed` alternates the models repeat by repeat in
one process, so drifts (frequency scaling, other load) hit both alike.

Honest expectations (see BENCHMARKS.md): unstructured or N:M zeros stored densely run the same
dense kernels, so a one-shot pruned model is no faster on CPU (ratio ~1.0); a Minitron model with
fewer layers or narrower matrices is faster in proportion. :class:`SparseLinear` runs a Linear as
a CSR matmul (``torch.sparse.mm``), which can pay off on CPU only at high sparsity; it exists for
benchmarks (``benchmarks/bench_speed.py``).
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning_core.arch import eval_mode, model_device
from pruning_core.errors import ConfigError


def _check(prompt_tokens: int, decode_tokens: int, repeats: int, warmup: int, batch_size: int) -> None:
    for field, value, low in (("prompt_tokens", prompt_tokens, 1), ("decode_tokens", decode_tokens, 1),
                              ("repeats", repeats, 1), ("warmup", warmup, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(field, f"must be an integer >= {low}, got {value!r}")


def _prompt(model: nn.Module, batch_size: int, prompt_tokens: int, seed: int) -> torch.Tensor:
    vocab = int(model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_tokens), generator=g).to(model_device(model))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_keyword(model: nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_once(model: nn.Module, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """``(prefill seconds, decode seconds)`` of one run: the prompt ``[b, T]`` with a KV cache, then
    ``decode_tokens`` greedy steps of one token each."""
    device, key = prompt.device, _cache_keyword(model)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
        cache, token = out[key], out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = out[key], out.logits[:, -1:].argmax(-1)
        _sync(device)
        return prefill, time.perf_counter() - start


def _rates(times: list[tuple[float, float]], tokens: tuple[int, int]) -> dict[str, Any]:
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    return {"prefill_tokens_per_s": tokens[0] / prefill, "decode_tokens_per_s": tokens[1] / decode,
            "prefill_seconds": prefill, "decode_seconds": decode, "repeats": len(times)}


def compare_speed(models: dict[str, nn.Module], *, prompt_tokens: int = 64, decode_tokens: int = 16,
                  repeats: int = 5, warmup: int = 1, batch_size: int = 1, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Speed of several models measured alternately, repeat by repeat (same prompt for all).

    Args:
        models: name -> causal LM (``transformers`` style: ``input_ids``, ``use_cache``,
            ``past_key_values``), each on its device; run in eval mode, no grad.
        prompt_tokens, decode_tokens: tokens per row of the prefill and decode phases.
        repeats: timed runs per model (medians reported); warmup: untimed runs first.
        batch_size: rows of the prompt; seed: of the random prompt tokens.

    Returns:
        name -> ``{"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_seconds",
        "decode_seconds", "repeats", "batch_size", "prompt_tokens", "decode_tokens", "device"}``
        (tokens per second count every row: ``batch_size * tokens / median seconds``).

    Raises:
        ConfigError: a count that is not a positive integer (warmup may be 0), or no models.
    """
    _check(prompt_tokens, decode_tokens, repeats, warmup, batch_size)
    if not models:
        raise ConfigError("models", "nothing to measure")
    prompts = {name: _prompt(m, batch_size, prompt_tokens, seed) for name, m in models.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for run in range(warmup + repeats):
        for name, model in models.items():
            with eval_mode(model):
                t = time_once(model, prompts[name], decode_tokens)
            if run >= warmup:
                times[name].append(t)
    tokens = (batch_size * prompt_tokens, batch_size * decode_tokens)
    return {name: {**_rates(times[name], tokens), "batch_size": batch_size, "prompt_tokens": prompt_tokens,
                   "decode_tokens": decode_tokens, "device": str(model_device(models[name]))} for name in models}


def measure_speed(model: nn.Module, **options: Any) -> dict[str, Any]:
    """Prefill and decode tokens/s of one model (median of ``repeats``); see :func:`compare_speed`."""
    return compare_speed({"model": model}, **options)["model"]


def speed_ratio(dense: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """``other`` / ``dense`` tokens per second, per phase (> 1: faster than dense)."""
    return {"prefill_ratio": other["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "decode_ratio": other["decode_tokens_per_s"] / dense["decode_tokens_per_s"]}


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of a model directory's safetensors files (what loading it in its stored dtype takes)."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")), None)
    return None if kib is None else kib * 1024


def compare_model_dirs(dense_dir: str | Path, output_dir: str | Path, *, device: str = "cpu",
                       load: Callable[[str, str], Any] | None = None, **options: Any) -> dict[str, Any]:
    """Load two model directories (``load(dir, device) -> (model, tokenizer)``, default
    :func:`pruning_core.lm.load_causal_lm` in float32) and :func:`compare_speed` them.

    Returns:
        ``{"dense": rates, "output": rates, "prefill_ratio", "decode_ratio", "device"}``.
    """
    if load is None:
        from pruning_core.lm.models import load_causal_lm

        def load(d: str, dev: str) -> Any:
            return load_causal_lm(d, device=dev)
    models = {"dense": load(str(dense_dir), device)[0], "output": load(str(output_dir), device)[0]}
    result = compare_speed(models, **options)
    del models
    gc.collect()
    return {**result, **speed_ratio(result["dense"], result["output"]), "device": result["dense"]["device"]}


class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored in CSR and multiplied with ``torch.sparse.mm``.

    ``y = x Wᵀ + b`` as ``(W_csr @ xᵀ)ᵀ``; ``x`` is ``[..., in]``, ``y`` ``[..., out]``. Exact up to
    float summation order. For speed benchmarks on CPU (pays off only at high sparsity).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def sparsify_linears(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named ``nn.Linear`` modules of ``model`` by :class:`SparseLinear` (in place)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, nn.Linear):
            raise ConfigError("names", f"'{name}' is a {type(module).__name__}, not an nn.Linear")
        setattr(parent, child, SparseLinear(module))
    return model


__all__ = ["SparseLinear", "compare_model_dirs", "compare_speed", "measure_speed", "sparsify_linears",
           "speed_ratio", "time_once"]
