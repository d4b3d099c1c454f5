"""Calibration hook overhead on SmolLM2-135M: plain forward vs collect_activation_stats.

Runs ``--batches`` batches of ``--batch-size`` x ``--seq-len`` Emma tokens (seed 0) through the
full model (211 nn.Linear layers hooked, lm_head included), interleaving the variants
``--repeats`` times, and reports median wall and CPU (process) seconds and their ratios to the
plain forward (on a shared, oversubscribed machine the CPU time of a 1-thread run is the stable
measure of the work done; wall time includes waiting for a core):

- plain: ``model(ids, use_cache=False)`` under ``torch.no_grad()`` (the call the collector makes);
- stats: ``collect_activation_stats(model, batches)`` (Σx², Σ|x| per layer);
- stats, no sharing: the same with the shared-input cache disabled (q/k/v and gate/up each
  recompute their partial sums);
- stats, f64 partial sums: each batch's Σx², Σ|x| reduced in float64 instead of float32;
- hessian f32 / f64: ``hessian=True`` with the per-batch partial sums and XᵀX in float32 /
  float64 (and f32 without sharing).

It also checks that the shared and unshared statistics are identical.

Usage: python benchmarks/bench_calibration.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._smollm2 import emma_windows, load_smollm2  # noqa: E402
from pruning_core.calibration import capture, collect_activation_stats  # noqa: E402


def plain(model, batches):
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)  # as collect_activation_stats calls it


def no_sharing(model, batches, **kwargs):
    original = capture._PartialsCache.get
    capture._PartialsCache.get = lambda self, x, tokens: capture.batch_partials(  # type: ignore[method-assign]
        tokens, hessian=self.hessian, batch_dtype=self.batch_dtype)
    try:
        return collect_activation_stats(model, batches, progress=False, **kwargs)
    finally:
        capture._PartialsCache.get = original  # type: ignore[method-assign]


def _variants(model, batches) -> dict[str, Callable[[], Any]]:
    return {
        "plain forward": lambda: plain(model, batches),
        "stats (no hessian)": lambda: collect_activation_stats(model, batches, progress=False),
        "stats, no sharing": lambda: no_sharing(model, batches),
        "stats + hessian (XᵀX f32)": lambda: collect_activation_stats(model, batches, hessian=True, progress=False),
        "stats + hessian (XᵀX f32), no sharing": lambda: no_sharing(model, batches, hessian=True),
        "stats, f64 partial sums": lambda: collect_activation_stats(
            model, batches, progress=False, batch_dtype=torch.float64),
        "stats + hessian (XᵀX f64)": lambda: collect_activation_stats(
            model, batches, hessian=True, progress=False, batch_dtype=torch.float64),
    }


def _measure(variants: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict, dict, dict]:
    """Wall and CPU seconds of every variant, ``repeats`` rounds in turn, and each one's last result."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return times, cpu, results


def _report(args: argparse.Namespace, times: dict, cpu: dict, results: dict) -> None:
    shared, unshared = results["stats (no hessian)"], results["stats, no sharing"]
    same = all(torch.equal(s.sum_sq, unshared.require_stats(n).sum_sq) for n, s in shared)
    h32, h64 = results["stats + hessian (XᵀX f32)"], results["stats + hessian (XᵀX f64)"]
    rel = max(float((s.xtx - h64.require_stats(n).xtx).norm() / h64.require_stats(n).xtx.norm()) for n, s in h32)
    base = statistics.median(times["plain forward"])
    base_cpu = statistics.median(cpu["plain forward"])
    tokens = args.batches * args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {tokens} tokens "
          f"({args.batches} x {args.batch_size} x {args.seq_len}), repeats {args.repeats}")
    print("| variant | median wall s | wall vs plain | median CPU s | CPU vs plain | all wall runs s |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(f"| {name} | {med:.2f} | {med / base:.3f} | {med_cpu:.2f} | {med_cpu / base_cpu:.3f} | "
              f"{', '.join(f'{t:.2f}' for t in ts)} |")
    print(f"\nshared == unshared statistics: {same}; max relative ‖XᵀX_f32 - XᵀX_f64‖/‖XᵀX_f64‖ = {rel:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    ids = emma_windows(tok, args.batches * args.batch_size, args.seq_len, seed=0)
    batches = list(ids.split(args.batch_size))
    variants = _variants(model, batches)
    plain(model, batches[:1])  # warm-up
    _report(args, *_measure(variants, args.repeats))


if __name__ == "__main__":
    main()
