"""A Hugging Face model card (``README.md``) for a pruned, quantized or Minitron-shrunk model.

Stage: outputs. :func:`render_model_card` turns a plain mapping (a job's summary, see the keys
below) into the card the Hub shows: YAML front matter (``base_model``, ``tags``,
``library_name: transformers``, ``pipeline_tag``) and a body with what was done, on which data,
what it costs in perplexity, bytes and speed, the configuration and command that made it, and
how to load it. No I/O but :func:`write_model_card`; rendering is deterministic (golden tests).

Keys read (all optional but ``kind``):

* ``kind``: ``"oneshot"`` or ``"minitron"``; ``base_model``: the input (a Hub id or a path);
* one-shot: ``method``, ``pattern``, ``sparsity`` (achieved), ``target_sparsity``, ``scope``;
* Minitron: ``architecture``: ``{"before": {field: value}, "after": {field: value}}``;
* ``quantization``: ``{"method", "bits", "group_size", "symmetric"}`` (None: not quantized);
* ``calibration`` / ``evaluation``: ``{"text", "num_windows", "window_length"}``;
* ``perplexity_before``, ``perplexity_after``;
* ``size``: ``{"input_bytes", "output_bytes"}``; ``speed``: ``{"prefill_ratio", "decode_ratio", ...}``;
* ``config``: the job's YAML text; ``command``: the shell command; ``format``: ``"pack-quantized"``
  when the directory is a compressed-tensors checkpoint (its load line says so).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning_core.io.atomic import atomic_write_text

#: Local model aliases -> the Hub id their weights came from.
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M"}


def hub_id(model: str | None) -> str | None:
    """The Hub id of a job's ``model`` (an alias, a ``owner/name`` id), or None for a local path."""
    if not model:
        return None
    if model in HUB_IDS:
        return HUB_IDS[model]
    parts = model.split("/")
    return model if len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and \
        not Path(model).exists() else None


ARCHITECTURE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads")


def architecture_fields(config: Any) -> dict[str, Any]:
    """The sizes a Minitron card compares, from a ``transformers`` config (those it has)."""
    return {k: getattr(config, k) for k in ARCHITECTURE_FIELDS if getattr(config, k, None) is not None}


def _front_matter(info: Mapping[str, Any]) -> list[str]:
    tags = ["pruned", "pruning-pipeline"]
    if info.get("kind") == "minitron":
        tags += ["minitron", "structured-pruning"]
    elif info.get("method"):
        tags += [str(info["method"]), "sparse"]
    if info.get("quantization"):
        tags += ["compressed-tensors", f"w{info['quantization']['bits']}a16"]
    lines = ["---"]
    base = hub_id(info.get("base_model"))
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", ""]
    return lines


def _method(info: Mapping[str, Any]) -> list[str]:
    if info.get("kind") == "minitron":
        arch = info.get("architecture") or {}
        before, after = arch.get("before", {}), arch.get("after", {})
        rows = [f"| {k} | {before.get(k, '')} | {after.get(k, '')} |" for k in sorted(set(before) | set(after))]
        return ["## Method", "", "Minitron structured pruning (depth and/or width): a smaller dense model.", "",
                "| | base | pruned |", "|---|---|---|", *rows, ""]
    lines = ["## Method", "", f"One-shot **{info.get('method')}** pruning, pattern `{info.get('pattern')}`"
             + (f", scope {info['scope']}" if info.get("scope") else "") + "."]
    if info.get("sparsity") is not None:
        lines.append(f"Sparsity of the pruned layers: {info['sparsity']:.4f} (target {info.get('target_sparsity')}).")
    return lines + [""]


def _quantization(info: Mapping[str, Any]) -> list[str]:
    q = info.get("quantization")
    if not q:
        return ["## Quantization", "", "None: weights are stored in the input's dtype.", ""]
    group = "per output channel" if q.get("group_size") == -1 else f"groups of {q.get('group_size')}"
    return ["## Quantization", "",
            f"Weight-only {q.get('method', 'gptq').upper()} to {q.get('bits')} bits, {group}, "
            f"{'symmetric' if q.get('symmetric', True) else 'asymmetric'} (W{q.get('bits')}A16), keeping the "
            "pruning mask; " + ("stored in compressed-tensors' `pack-quantized` format." if info.get("format")
                                == "pack-quantized" else "stored dequantized, as plain tensors (the packed "
                                "checkpoint is `model-quantized/`)."), ""]


def _data(info: Mapping[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    for what in ("calibration", "evaluation"):
        d = info.get(what)
        if d:
            lines.append(f"- {what.capitalize()}: `{d.get('text')}`, {d.get('num_windows')} windows of "
                         f"{d.get('window_length')} tokens.")
    return lines + [""]


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _results(info: Mapping[str, Any]) -> list[str]:
    lines = ["## Results", "", "| metric | value |", "|---|---|",
             f"| perplexity before | {_fmt(info.get('perplexity_before'))} |",
             f"| perplexity after | {_fmt(info.get('perplexity_after'))} |"]
    size = info.get("size") or {}
    if size.get("input_bytes") and size.get("output_bytes"):
        ratio = size["output_bytes"] / size["input_bytes"]
        lines.append(f"| size on disk | {size['output_bytes'] / 1e6:.1f} MB "
                     f"({ratio:.3f} of the input's {size['input_bytes'] / 1e6:.1f} MB) |")
    speed = info.get("speed") or {}
    for phase in ("prefill", "decode"):
        if speed.get(f"{phase}_ratio") is not None:
            lines.append(f"| {phase} speed vs. dense | {speed[f'{phase}_ratio']:.2f}x "
                         f"(measured on {speed.get('device', 'cpu')}) |")
    return lines + [""]


def _usage(info: Mapping[str, Any]) -> list[str]:
    lines = ["## How it was made", ""]
    if info.get("command"):
        lines += ["```bash", str(info["command"]), "```", ""]
    if info.get("config"):
        lines += ["```yaml", str(info["config"]).rstrip(), "```", ""]
    need = " (needs `pip install compressed-tensors`)" if info.get("format") == "pack-quantized" else ""
    return lines + ["## How to load" + need, "", "```python",
                    "from transformers import AutoModelForCausalLM, AutoTokenizer",
                    'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
                    'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", ""]


def render_model_card(info: Mapping[str, Any]) -> str:
    """The ``README.md`` text of a job's output model (keys: see the module docstring)."""
    base = str(info.get("base_model") or "a causal LM")
    what = "Minitron-pruned" if info.get("kind") == "minitron" else f"{info.get('method')} {info.get('pattern')}"
    if info.get("quantization"):
        what += f", W{info['quantization']['bits']}A16"
    lines = _front_matter(info) + [f"# {hub_id(base) or Path(base).name} ({what})", "",
                                   "Made with the pruning pipeline.", ""]
    for part in (_method, _quantization, _data, _results, _usage):
        lines += part(info)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(model_dir: str | os.PathLike[str], info: Mapping[str, Any]) -> Path:
    """Write :func:`render_model_card` to ``model_dir/README.md`` atomically; returns the path."""
    path = Path(model_dir) / "README.md"
    atomic_write_text(path, render_model_card(info))
    return path


__all__ = ["ARCHITECTURE_FIELDS", "HUB_IDS", "architecture_fields", "hub_id", "render_model_card", "write_model_card"]
