"""Perplexity of a causal LM on token windows, and greedy generation.

Stage: evaluation. :func:`perplexity` computes exactly what the Wanda/SparseGPT references'
``eval_ppl_wikitext`` computes: every window of ``L`` tokens is run on its own (no state is
carried between windows), token ``t`` (``1 <= t < L``) is predicted from tokens ``0..t-1``,
and the result is ``exp`` of the mean negative log-likelihood over all ``n * (L - 1)``
predicted tokens. (The references multiply each batch's mean loss by ``L * batch`` and divide
the sum by ``n * L``; since every window predicts ``L - 1`` tokens, that is the same mean.)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning_core.errors import ConfigError, NumericalInstability
from pruning_core.validate import check_rank

logger = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_windows(windows: torch.Tensor, batch_size: int, vocab: int) -> None:
    """Raise :class:`ConfigError` unless ``windows`` is an ``[n >= 1, L >= 2]`` int tensor of ids in
    ``[0, vocab)`` and ``batch_size`` an int >= 1."""
    check_rank(windows, 2, name="windows", what="[n, length] token tensor")
    if windows.dtype not in (torch.int64, torch.int32):
        raise ConfigError("windows", f"token ids must be int64 or int32, got {windows.dtype}")
    n, length = windows.shape
    if n < 1 or length < 2:
        raise ConfigError("windows", f"need at least 1 window of at least 2 tokens, got shape {[n, length]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an int >= 1, got {batch_size!r}")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab:
        raise ConfigError(
            "windows", f"token ids must lie in [0, {vocab - 1}] (the model's vocabulary), got [{low}, {high}]"
        )


def nll_from_logits(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood per window: logits ``[b, L, V]`` (any float dtype)
    and ids ``[b, L]`` -> ``[b]`` float64. The cross-entropy is computed in float32."""
    b, length, vocab = logits.shape
    # Position t predicts token t+1; the last position predicts nothing (ignore_index), which
    # avoids copying the [b, L-1, V] slice of the logits.
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]  # [b, L]
    nll = F.cross_entropy(logits.reshape(b * length, vocab).float(), targets.reshape(-1), reduction="none")
    return nll.reshape(b, length).double().sum(dim=1)


def check_nll(nll: float, lo: int, hi: int) -> float:
    """``nll`` if finite, else :class:`NumericalInstability` naming windows ``lo..hi``."""
    if not math.isfinite(nll):
        raise NumericalInstability("perplexity", f"non-finite loss {nll} on windows {lo}..{hi}")
    return nll


def window_nll(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window: ``[b, L]`` ids -> ``[b]`` float64.

    Logits come from the model's own forward (so any output head or logit transform is honoured);
    the cross-entropy is computed in float32 or wider (:func:`nll_from_logits`).
    """
    return nll_from_logits(model(input_ids=batch, use_cache=False).logits, batch)


def perplexity(model: Any, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> float:
    """Perplexity ``exp(mean NLL)`` over every predicted token of the windows.

    Args:
        model: A causal LM returning ``.logits`` of shape ``[b, L, V]``; it is put in eval mode.
        windows: ``[n, L]`` token ids (e.g. :func:`pruning_core.lm.text.evaluation_windows`).
        batch_size: Windows per forward pass; the result does not depend on it.
        progress: Show a tqdm bar over batches.

    Returns:
        ``exp(sum of NLL / (n * (L - 1)))`` as a Python float.

    Raises:
        ConfigError: a malformed ``windows`` tensor or token ids outside the vocabulary.
        NumericalInstability: the model produced a non-finite loss (names the windows).
    """
    check_windows(windows, batch_size, model.get_input_embeddings().num_embeddings)
    model.eval()
    device = _model_device(model)
    n, length = windows.shape
    total = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = windows[lo : lo + batch_size].to(device=device, dtype=torch.long)
            total += check_nll(float(window_nll(model, batch).sum()), lo, min(lo + batch_size, n) - 1)
    seconds = time.perf_counter() - start
    result = math.exp(total / (n * (length - 1)))
    logger.info(
        "perplexity %.4f on %d x %d tokens in %.1f s (%.0f tokens/s)",
        result,
        n,
        length,
        seconds,
        n * length / seconds,
    )
    return result


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` with the KV cache; returns only the new text.

    Sampling settings in the model's generation config are overridden (``do_sample=False``).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be an int >= 1, got {max_new_tokens!r}")
    from transformers import GenerationConfig

    enc = tokenizer(prompt, return_tensors="pt").to(_model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


__all__ = ["check_nll", "check_windows", "generate_text", "nll_from_logits", "perplexity", "window_nll"]
