"""Non-uniform sparsity on SmolLM2-135M (issue 16): uniform vs OWL vs the allocation search.

Protocol (``benchmarks/_quality.py``): calibration 64 x 256 tokens of Emma (seed 0); perplexity on
the first 64 x 256 tokens of Pride and Prejudice (dense 28.93) and of Persuasion. Methods in their
natural mode: Wanda one pass (per-row groups), SparseGPT sequential (block i calibrated on the
pruned blocks < i). Rows:

* ``uniform-<method>-<s>``: ``prune_module`` / ``prune_sequential`` at one sparsity (the one-shot
  job's numbers: Wanda 70% 430.5, SparseGPT 70% 116.7);
* ``owl-<method>-<s>-<granularity>-m<M>-l<lambda>``: OWL allocation from one-pass Wanda scores of
  the dense model, then the method at the allocated per-layer sparsities;
* ``transfer-<method>-from-<row>``: ``<method>`` at the allocation another row found (e.g.
  SparseGPT at the allocation the Wanda search found);
* ``search-<method>-<s>-<granularity>-...``: the EvoPress-style search started from an OWL row's
  allocation. Its database prunes every unit at every grid level from the dense model's one-pass
  statistics (XᵀX for SparseGPT, variants kept on disk); fitness = KL(dense || pruned) on the
  first calibration windows (``--fitness-windows 2,8``: 2 windows at selection stage 0, 8 at stage
  1). The found allocation is then pruned in the method's natural mode and evaluated.

Every row is appended to the JSON file (``--out``) when done; a search's state is saved after
every selection step under the work directory, so a killed run resumes (``--resume`` skips
finished rows). Caches (statistics, the search databases) live in ``--work``.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_allocation.py --rows uniform-wanda-0.7 \
        owl-wanda-0.7-block-m5-l0.08 --resume
    PYTHONPATH=. python benchmarks/bench_allocation.py --tables
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _allocation_search as S  # noqa: E402
import _quality as Q  # noqa: E402

from pruning_core.allocation import (  # noqa: E402
    Allocation,
    allocation_from_ratios,
    allocation_units,
    layer_targets,
    prune_allocated_,
    prune_allocated_sequential_,
)
from pruning_core.allocation.owl import unit_outlier_ratios  # noqa: E402
from pruning_core.calibration.capture import collect_activation_stats  # noqa: E402
from pruning_core.calibration.context import CalibrationContext  # noqa: E402
from pruning_core.calibration.stats import ActivationStats  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.pruning import prune_module, prune_sequential  # noqa: E402

log = logging.getLogger("bench_allocation")
ROW = re.compile(r"(?P<kind>uniform|owl|search)-(?P<method>wanda|sparsegpt|magnitude)-(?P<s>[0-9.]+)"
                 r"(?:-(?P<gran>block|layer)-m(?P<m>[0-9.]+)-l(?P<lam>[0-9.]+))?(?P<rest>.*)")


class Bench:
    """The model, windows and caches shared by the rows of one run."""

    def __init__(self, work: Path, eval_windows: int) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = Q.load_model()
        self.calibration = Q.calibration(self.tokenizer)
        self.batches = list(self.calibration.split(8))
        self.evaluation = Q.evaluation(self.tokenizer, n=eval_windows)
        self.units = {g: allocation_units(self.model, g) for g in ("block", "layer")}
        self.names = [n for u in self.units["block"] for n in u.layers]
        self.dense = Q.snapshot(self.model, self.names)

    def stats(self, hessian: bool) -> CalibrationContext:
        """One-pass statistics of the dense model (cached in the work directory)."""
        path = self.work / ("stats_hessian.pt" if hessian else "stats.pt")
        if not path.exists():
            ctx = collect_activation_stats(self.model, self.batches, layers=self.names, hessian=hessian, progress=False)
            torch.save({n: s.to_arrays() for n, s in ctx}, path)
        ctx = CalibrationContext("emma")
        for name, a in torch.load(path).items():
            ctx.add_layer_stats(name, ActivationStats.from_arrays(a["sum_sq"], a["sum_abs"], a["count"], a["xtx"]))
        return ctx

    def owl(self, method: str, s: float, gran: str, m: float, lam: float) -> Allocation:
        units = self.units[gran]
        ratios = unit_outlier_ratios(self.model, self.stats(False), units, m)
        return allocation_from_ratios(units, ratios, s, lam)

    def prune_at(self, alloc: Allocation, method: str) -> None:
        """Prune the (dense) model at ``alloc`` in the method's natural mode."""
        targets = layer_targets(self.model, alloc, method)
        if method == "sparsegpt":
            prune_allocated_sequential_(self.model, self.batches, targets, method)
        else:
            prune_allocated_(self.model, self.stats(False) if method == "wanda" else None, targets, method)

    def prune_uniform(self, method: str, s: float) -> None:
        if method == "sparsegpt":
            sparsegpt = get_method("sparsegpt")
            prune_sequential(self.model, self.batches, sparsegpt, sparsegpt.spec(s), progress=False, measure_memory=False)
        else:
            wanda = get_method("wanda")
            prune_module(self.model, wanda, wanda.spec(s), self.stats(False), measure_memory=False)

    def measure(self, prune: Any) -> dict[str, Any]:
        """Prune (timed), evaluate on every held-out text (timed), restore the dense weights."""
        _, prune_s = Q.timed(prune)
        row: dict[str, Any] = {"prune_s": round(prune_s, 1), "sparsity": Q.zero_fraction(self.model, self.names)}
        ppl, eval_s = Q.timed(lambda: Q.perplexities(self.model, self.evaluation))
        row.update({"perplexity": ppl, "eval_s": round(eval_s, 1)})
        Q.restore_(self.model, self.dense)
        return row


TRANSFER = re.compile(r"transfer-(?P<method>wanda|sparsegpt|magnitude)-from-(?P<source>.+)")


def run_row(bench: Bench, row_id: str, args: argparse.Namespace, results: Q.Results) -> dict[str, Any]:
    if (transfer := TRANSFER.fullmatch(row_id)) is not None:  # another row's allocation, another method
        alloc = Allocation.from_dict(results.get(transfer["source"])["allocation"])
        row = bench.measure(lambda: bench.prune_at(alloc, transfer["method"]))
        return {**row, "allocation": alloc.to_dict()}
    if row_id == "dense":
        ppl, seconds = Q.timed(lambda: Q.perplexities(bench.model, bench.evaluation))
        return {"perplexity": ppl, "eval_s": round(seconds, 1), "sparsity": 0.0}
    match = ROW.fullmatch(row_id)
    if match is None:
        raise SystemExit(f"unknown row {row_id!r}")
    kind, method, s = match["kind"], match["method"], float(match["s"])
    if kind == "uniform":
        return bench.measure(lambda: bench.prune_uniform(method, s))
    alloc = bench.owl(method, s, match["gran"], float(match["m"]), float(match["lam"]))
    extra: dict[str, Any] = {}
    if kind == "search":
        alloc, extra = S.search(bench, alloc, method, S.SearchArgs.parse(match["rest"], args), row_id)
    row = bench.measure(lambda: bench.prune_at(alloc, method))
    return {**row, **extra, "allocation": alloc.to_dict()}


def tables(results: Q.Results) -> str:
    rows = results.data["rows"]
    lines = ["| row | P&P | ratio vs uniform | Persuasion | ratio | sparsity | prune s | search s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rid, r in sorted(rows.items()):
        match = ROW.fullmatch(rid) or TRANSFER.fullmatch(rid)
        target = r.get("allocation", {}).get("target")
        base = rows.get(f"uniform-{match['method']}-{target}") if match and target is not None else None
        ratio = {t: (r["perplexity"][t] / base["perplexity"][t] if base else float("nan")) for t in Q.EVAL_TEXTS}
        lines.append(f"| {rid} | {r['perplexity']['pride_and_prejudice']:.2f} | {ratio['pride_and_prejudice']:.3f} "
                     f"| {r['perplexity']['persuasion']:.2f} | {ratio['persuasion']:.3f} | {r['sparsity']:.5f} "
                     f"| {r.get('prune_s', 0):.0f} | {r.get('search_s', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["dense", "uniform-wanda-0.7", "owl-wanda-0.7-block-m5-l0.08"])
    parser.add_argument("--out", type=Path, default=Q.REPO / "benchmarks" / "results" / "allocation.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_allocation"))
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--resume", action="store_true", help="skip rows already in --out")
    Q.add_threads_argument(parser)
    parser.add_argument("--tables", action="store_true", help="print the Markdown table and exit")
    S.add_arguments(parser)
    args = parser.parse_args()
    Q.start(args)
    results = Q.Results(args.out)
    if args.tables:
        print(tables(results))  # noqa: T201
        return
    bench = Bench(args.work, args.eval_windows)
    for row_id in args.rows:
        if args.resume and results.has(row_id):
            continue
        start, cpu = time.perf_counter(), Q.cpu_seconds()
        row = run_row(bench, row_id, args, results)
        row.update({"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(Q.cpu_seconds() - cpu, 1),
                    "eval_windows": args.eval_windows,
                    "peak_rss_mib": round(Q.peak_rss_mib())})
        results.put(row_id, row)
        log.info("%s: %s", row_id, json.dumps({k: row[k] for k in ("perplexity", "sparsity", "wall_s")}))


if __name__ == "__main__":
    main()
