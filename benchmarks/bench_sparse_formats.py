"""Sparse-format matmul versus dense ``torch.matmul`` at 50/90/99% sparsity on real layer shapes.

For each weight shape ``[out, in]`` and sparsity, a random weight is pruned by magnitude and
multiplied with a dense activation batch ``x[in, batch]``:

* dense: ``torch.matmul`` of the masked dense weight (the baseline, same run);
* CSR and COO: unstructured magnitude mask; torch's CPU sparse kernels (MKL);
* block 16x16 and 32x32: a block mask (magnitude, block sums); torch's BSR kernel (MKL);
* 2:4 (50% only): :meth:`SemiStructuredTensor.matmul` (a sparse kernel over the stored slots)
  and, labelled "decompress+dense", ``to_dense() @ x`` - not a sparse kernel.

Times are medians over --repeats rounds; the methods run round-robin inside each round so that
load drift on the shared machine hits all of them alike. "CPU ms" is the median CPU time of this
process (``time.process_time``, all threads): with ``--threads 1`` it approximates an unloaded
core. Memory: ``nbytes`` of every stored
array versus the dense weight, and the peak-RSS increase of ONE call over the RSS before it
(Linux: ``malloc_trim(0)``, then reset the high-water mark through ``/proc/self/clear_refs``
and read ``VmHWM``; this includes the output tensor).

    python benchmarks/bench_sparse_formats.py [--shapes 1536x576 4096x4096] [--batch 256]
        [--repeats 7] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import time
from collections.abc import Callable

import torch

from pruning_core.masks import generate_block_mask, generate_nm_mask, generate_unstructured_mask
from pruning_core.sparse import BlockSparseTensor, COOTensor, CSRTensor, SemiStructuredTensor

_LIBC = ctypes.CDLL("libc.so.6")


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def peak_extra_mb(fn: Callable[[], torch.Tensor]) -> float:
    """Peak RSS increase (MB) of one call of ``fn`` over the RSS just before it."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return (peak - before) / 1024


def methods(
    weight: torch.Tensor, x: torch.Tensor, sparsity: float
) -> dict[str, tuple[Callable, int, torch.Tensor]]:
    """name -> (call, stored bytes, the masked dense weight it represents)."""
    scores = weight.abs()
    unstructured = generate_unstructured_mask(scores, sparsity)
    dense_w = unstructured.apply(weight)
    csr = CSRTensor.from_dense(weight, unstructured)
    coo = COOTensor.from_dense(weight, unstructured)
    out = {
        "dense (torch.matmul)": (lambda: dense_w @ x, dense_w.numel() * 4, dense_w),
        "CSR": (lambda: csr @ x, csr.nbytes, dense_w),
        "COO": (lambda: coo @ x, coo.nbytes, dense_w),
    }
    for b in (16, 32):
        mask = generate_block_mask(scores, b, b, sparsity)
        blk = BlockSparseTensor.from_dense(weight, mask)
        out[f"block {b}x{b}"] = (lambda blk=blk: blk @ x, blk.nbytes, mask.apply(weight))
    if sparsity == 0.5:
        mask = generate_nm_mask(scores, 2, 4)
        semi = SemiStructuredTensor.from_dense(weight, mask)
        out["2:4 sparse kernel"] = (lambda: semi @ x, semi.nbytes, mask.apply(weight))
        out["2:4 decompress+dense"] = (lambda: semi.matmul_decompressed(x), semi.nbytes, mask.apply(weight))
    return out


def bench(shape: tuple[int, int], sparsity: float, batch: int, repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g)
    x = torch.randn(shape[1], batch, generator=g)
    cands = methods(weight, x, sparsity)
    for name, (fn, _, dense_w) in cands.items():  # warm-up and exactness check
        torch.testing.assert_close(fn(), dense_w @ x, rtol=1e-3, atol=1e-3, msg=name)
    times: dict[str, list[float]] = {name: [] for name in cands}
    cpu: dict[str, list[float]] = {name: [] for name in cands}
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for name, (fn, _, _) in cands.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    load1 = os.getloadavg()[0]
    dense_t = statistics.median(times["dense (torch.matmul)"])
    dense_bytes = shape[0] * shape[1] * 4
    rows = []
    for name, (fn, nbytes, _) in cands.items():
        t = statistics.median(times[name])
        rows.append(
            f"| {shape[0]}x{shape[1]} | {sparsity:.0%} | {name} | {t * 1e3:.2f} | {dense_t / t:.2f}x | "
            f"{statistics.median(cpu[name]) * 1e3:.2f} | "
            f"{nbytes / 2**20:.2f} | {nbytes / dense_bytes:.3f} | {peak_extra_mb(fn):.1f} | {load0:.1f}→{load1:.1f} |"
        )
        print(rows[-1], [round(v * 1e3, 2) for v in times[name]], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1536x576", "4096x4096"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.9, 0.99])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", default=None, help="append the result table to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (
        f"x = [in, {args.batch}] float32; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} round-robin rounds"
    )
    print(header)
    lines = [
        "| weight | sparsity | method | median ms | speedup vs dense | CPU ms | stored MB | bytes / dense "
        "| peak extra MB | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        for sparsity in args.sparsities:
            lines += bench(shape, sparsity, args.batch, args.repeats)
    table = "\n".join([header, "", *lines, ""])
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
