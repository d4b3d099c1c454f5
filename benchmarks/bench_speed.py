"""What pruning buys at inference on this machine: prefill and decode tokens/s of SmolLM2-135M variants.

Issue 15 §1 ("measured speedups"). Rows, all float32 on the CPU (bf16 matmuls are ~40x slower here):

* ``dense``: SmolLM2-135M as shipped (the baseline of every ratio, measured in the same run);
* ``unstructured50`` / ``nm24``: 50% unstructured and 2:4 zeros (magnitude masks: which weights are
  zero does not change dense kernels' speed; Wanda's masks would time the same), dense kernels;
* ``unstructured50-csr`` / ``unstructured90-csr``: the same zeros (and 90%) run as CSR matmuls
  (:class:`pruning_core.lm.speed.SparseLinear`, ``torch.sparse.mm``): the only CPU sparse kernel
  torch has; expected to lose at 50% and to have a chance only at high sparsity;
* ``minitron24``: a Minitron-shaped smaller model, 24 of the 30 decoder layers (the last 6 but the
  final one dropped), a genuinely smaller dense model.

Timing: :func:`pruning_core.lm.speed.compare_speed` alternates all rows repeat by repeat in one
process (a random prompt of ``--prompt`` tokens, then ``--decode`` greedy tokens with the KV cache;
medians of ``--repeats`` after a warmup). Peak RSS: each row is built and run once more in a child
process of its own (``VmHWM``, MiB), so rows do not share a high-water mark.

    nice -n 10 python benchmarks/bench_speed.py > /tmp/bench_speed.log 2>&1    # ~5 min, quiet machine
    python benchmarks/bench_speed.py --smoke                                  # seconds: 2 rows, few tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "speed.json"
ROWS = ("dense", "unstructured50", "nm24", "unstructured50-csr", "unstructured90-csr", "minitron24")


def _prune(model: nn.Module, sparsity: float | None, pattern: str) -> list[str]:
    """Magnitude masks on every prunable unit (in place); returns the unit names."""
    from pruning_core.arch import prunable_units
    from pruning_core.masks import SparsitySpec
    from pruning_core.methods import get_method

    method, spec = get_method("magnitude"), SparsitySpec.parse(sparsity, pattern)
    units = prunable_units(model)
    with torch.no_grad():
        for unit in units:
            weight, _ = method.prune_weight(unit.read(model), None, spec, name=unit.name)
            unit.write(model, weight)
    return [u.module for u in units]


def _drop_layers(model: Any, keep: int) -> Any:
    """Keep the first ``keep - 1`` decoder layers and the last one (re-indexed for the KV cache)."""
    layers = model.model.layers
    kept = [*list(layers)[: keep - 1], layers[-1]]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    model.model.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    return model


def build(row: str) -> nn.Module:
    """The row's model (float32, CPU, eval mode)."""
    from pruning_core.lm import load_causal_lm, smollm2_dir
    from pruning_core.lm.speed import sparsify_linears

    model = load_causal_lm(smollm2_dir(), dtype=torch.float32)[0]
    if row == "minitron24":
        return _drop_layers(model, 24)
    if row == "dense":
        return model
    sparsity, pattern = {"unstructured50": (0.5, "unstructured"), "nm24": (None, "2:4"),
                         "unstructured50-csr": (0.5, "unstructured"), "unstructured90-csr": (0.9, "unstructured")}[row]
    names = _prune(model, sparsity, pattern)
    return sparsify_linears(model, names) if row.endswith("-csr") else model


def child_rss(row: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of building and running ``row`` once in a fresh process."""
    cmd = [sys.executable, __file__, "--rss-of", row, "--prompt", str(args.prompt), "--decode", str(args.decode)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(out.stdout.strip().splitlines()[-1])


def _rss_of(row: str, args: argparse.Namespace) -> None:
    from pruning_core.lm.speed import measure_speed

    measure_speed(build(row), prompt_tokens=args.prompt, decode_tokens=args.decode, repeats=1, warmup=0)
    # VmHWM, not ru_maxrss: Linux carries the high-water mark of the forked parent (which holds
    # every row's model) across exec into ru_maxrss, so every row would report the parent's peak.
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pruning_core.lm.speed import compare_speed, speed_ratio

    rows = args.rows or (("dense", "minitron24") if args.smoke else ROWS)
    models = {row: build(row) for row in rows}
    result = compare_speed(models, prompt_tokens=args.prompt, decode_tokens=args.decode, repeats=args.repeats,
                           warmup=1, batch_size=args.batch_size)
    del models
    table = []
    for row in rows:
        r = result[row]
        table.append({"row": row, **{k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")},
                      **speed_ratio(result["dense"], r), "peak_rss_mib": child_rss(row, args)})
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
            "protocol": {"prompt_tokens": args.prompt, "decode_tokens": args.decode, "repeats": args.repeats,
                         "batch_size": args.batch_size, "dtype": "float32", "device": "cpu"},
            "rows": table}


def _print(report: dict[str, Any]) -> None:
    print("| row | prefill tok/s | decode tok/s | prefill x dense | decode x dense | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['row']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | {r['peak_rss_mib']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rows", nargs="*", choices=ROWS)
    parser.add_argument("--smoke", action="store_true", help="2 rows, 16 + 4 tokens, 2 repeats")
    parser.add_argument("--rss-of", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rss_of:
        return _rss_of(args.rss_of, args)
    if args.smoke:
        args.prompt, args.decode, args.repeats = 16, 4, 2
    report = run(args)
    _print(report)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
