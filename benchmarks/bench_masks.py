"""Mask-generation throughput on 2^26 float32 scores versus a naive full-sort baseline.

Measures ``generate_unstructured_mask`` (LAYER and ROW scope), and ``generate_nm_mask`` (2:4,
4:8), in million scores per second (median of --repeats runs), against a baseline measured in
the same run: the straightforward selection by a full stable ``torch.sort`` (descending) and a
scatter of the first L-k indices per comparison group. Every run checks that both give the
same mask (the baseline is the exactness reference too).

    python benchmarks/bench_masks.py [--log2n 26] [--repeats 5] [--markdown OUT.md]

The machine is shared: the 1-minute load average is printed before and after each case, and
the median CPU seconds of this process (``time.process_time``, all threads) are reported next to
the wall-clock medians; with ``--threads 1`` the CPU time approximates an unloaded core.

Peak memory: one more call of each, measured by ``benchmarks/_memory.py`` (peak RSS above the RSS
before the call, output included). For scale: the scores are 4 bytes each, the bool mask 1 byte.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _memory import peak_extra_mib

from pruning_core.masks import MaskScope, generate_nm_mask, generate_unstructured_mask
from pruning_core.validate import num_to_prune

TARGETS = {"unstructured LAYER": 50.0, "unstructured ROW": 50.0, "2:4": 200.0, "4:8": None}


def sort_baseline(groups: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Naive reference: full stable descending sort per group, keep the first n_keep."""
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n_keep]
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order, True)


def cases(scores: torch.Tensor, rows: int) -> dict[str, tuple[Callable, Callable]]:
    """name -> (ours, baseline), each returning a bool keep tensor shaped like the scores."""
    n = scores.numel()
    mat = scores.view(rows, n // rows)
    half = mat.shape[1] - num_to_prune(mat.shape[1], 0.5)
    return {
        "unstructured LAYER": (
            lambda: generate_unstructured_mask(mat, 0.5).tensor,
            lambda: sort_baseline(scores.view(1, n), n - num_to_prune(n, 0.5)).view(mat.shape),
        ),
        "unstructured ROW": (
            lambda: generate_unstructured_mask(mat, 0.5, scope=MaskScope.ROW).tensor,
            lambda: sort_baseline(mat, half),
        ),
        "2:4": (
            lambda: generate_nm_mask(mat, 2, 4).tensor,
            lambda: sort_baseline(scores.view(-1, 4), 2).view(mat.shape),
        ),
        "4:8": (
            lambda: generate_nm_mask(mat, 4, 8).tensor,
            lambda: sort_baseline(scores.view(-1, 8), 4).view(mat.shape),
        ),
    }


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, list[float], torch.Tensor]:
    """Median wall seconds, median CPU seconds (this process, all threads), all wall times, output."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), wall, out


def _row(name: str, ours: Callable[[], torch.Tensor], baseline: Callable[[], torch.Tensor], n: int,
         args: argparse.Namespace) -> str:
    """One table row: ours against the sort baseline (same mask asserted), CPU, peak memory, load."""
    load0 = os.getloadavg()[0]
    ours(), baseline()  # warm up
    t_ours, cpu_ours, all_ours, keep = timed(ours, args.repeats)
    t_base, cpu_base, all_base, ref = timed(baseline, args.baseline_repeats)
    assert torch.equal(keep, ref), f"{name}: mask differs from the sort baseline"
    del keep, ref
    _, mem_ours = peak_extra_mib(ours)
    _, mem_base = peak_extra_mib(baseline)
    load1 = os.getloadavg()[0]
    target = TARGETS[name]
    row = (
        f"| {name} | {t_ours:.3f} | {n / t_ours / 1e6:.0f} | {t_base:.3f} | {n / t_base / 1e6:.0f} | "
        f"{t_base / t_ours:.1f}x | {cpu_ours:.3f} | {cpu_base:.3f} | {mem_ours:.0f} | {mem_base:.0f} | "
        f"{target if target else '-'} | "
        f"{load0:.1f}→{load1:.1f} |"
    )
    print(row, "ours:", [round(t, 3) for t in all_ours], "baseline:", [round(t, 3) for t in all_base])
    return row


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=26)
    parser.add_argument("--rows", type=int, default=8192, help="rows of the [rows, n/rows] score matrix")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="subset of case names")
    parser.add_argument("--markdown", default=None, help="append the result table to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n = 1 << args.log2n
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    header = (
        f"n = 2^{args.log2n} = {n:,} float32 scores as [{args.rows}, {n // args.rows}]; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(header)
    lines = [
        "| case | ours median s | ours M elem/s | sort baseline median s | baseline M elem/s | speedup "
        "| ours CPU s | baseline CPU s | ours peak extra MiB | baseline peak extra MiB | target M/s "
        "| load avg (before→after) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, (ours, baseline) in cases(scores, args.rows).items():
        if not args.only or name in args.only:
            lines.append(_row(name, ours, baseline, n, args))
    table = "\n".join([header, "", *lines, ""])
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
