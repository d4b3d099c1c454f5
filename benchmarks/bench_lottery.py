"""Lottery Ticket quality and speed benchmark (issue 6 "Quality").

LeNet-300-100 on the full Fashion-MNIST (60k train / 10k test), the protocol of Frankle & Carbin
(2019) scaled to this machine: Adam, lr 1.2e-3, batch 60, 5,000 iterations per training run,
layer-wise pruning of 20% per round (hidden layers) and 10% (output layer), 10 rounds, 2 seeds.
IMP with rewinding to initialisation and to iteration k = 500, and both controls (random
re-initialisation, random mask of the same per-layer density) for each.

Speed: seconds per 5,000-iteration training run of our trainer versus facebookresearch/open_lth's
LeNet-300-100 training on the same data, timed in the same process run, alternating, medians, with
the CPU time of each run and the load average. open_lth is cloned from the fetched snapshot, patched
and run by ``benchmarks/_open_lth_reference.py`` (one process per run) under --ref-root.

The search state is saved after every round under --state-dir, so a killed run resumes.

    PYTHONPATH=. python benchmarks/bench_lottery.py                  # search + timing
    PYTHONPATH=. python benchmarks/bench_lottery.py --skip-search    # timing only (keeps the search)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _open_lth_reference as open_lth  # noqa: E402 - the reference runner beside this file

from pruning_core.lottery import (
    CONTROLS,
    ClassifierTrainFn,
    LotteryTicketConfig,
    LotteryTicketPruner,
    TrainingConfig,
    TrainSpec,
)
from pruning_core.vision import LeNet300100, load_fashion_mnist

STRATEGIES = ("init", "early:500")
METHODS = ("imp", "random_reinit", "random_mask")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None, help="quick runs only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state-dir", default="/tmp/bench_lottery_state")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--ref-root", type=Path, default=open_lth.DEFAULT_ROOT,
                   help="scratch directory for the patched open_lth clone and its torchvision")
    p.add_argument("--no-open-lth", action="store_true", help="time our trainer only")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--report-only", action="store_true", help="render lottery.md and the figure from lottery.json")
    return p.parse_args()


def lenet_config(strategy: str, seed: int, steps: int, rounds: int) -> LotteryTicketConfig:
    return LotteryTicketConfig(
        target_sparsity=None,
        pruning_rounds=rounds,
        prune_rate_per_round=0.2,
        global_pruning=False,
        layer_rates={"output.weight": 0.1},
        rewind_strategy=strategy,
        training_steps=steps,
        seed=seed,
    )


def run_search(args: argparse.Namespace, train_fn: ClassifierTrainFn) -> dict[str, list[dict]]:
    """Every (strategy, seed) search, resumable; returns the round records as dicts."""
    out: dict[str, list[dict]] = {}
    for strategy in STRATEGIES:
        for seed in args.seeds:
            cfg = lenet_config(strategy, seed, args.steps, args.rounds)
            model = LeNet300100(generator=torch.Generator().manual_seed(seed))
            store = Path(args.state_dir) / f"{strategy.replace(':', '')}_seed{seed}_{cfg.hashname()}"
            t0 = time.perf_counter()
            ticket = LotteryTicketPruner(cfg).find_ticket(model, train_fn, store=store, controls=CONTROLS)
            print(f"{strategy} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            out[f"{strategy}/{seed}"] = [r.to_dict() for r in ticket.records]
    return out


def time_ours(train_fn: ClassifierTrainFn, steps: int) -> dict[str, float]:
    """One dense run of our trainer as a search round runs it (all-True masks, test set at the end)."""
    model = LeNet300100(generator=torch.Generator().manual_seed(0))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    w0, c0 = time.perf_counter(), time.process_time()
    metrics = train_fn(model, masks, TrainSpec(0, steps, seed=0))
    return {"seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0,
            "test_accuracy": metrics["accuracy"]}


TIMED = ("ours", "open_lth_standard", "open_lth_loop")


def run_timing(args: argparse.Namespace, train_fn: ClassifierTrainFn) -> dict[str, object]:
    """Alternate ours / open_lth standard / open_lth loop, ``timing_repeats`` times (wall, CPU, load)."""
    wall: dict[str, list[float]] = {k: [] for k in TIMED}
    cpu: dict[str, list[float]] = {k: [] for k in TIMED}
    acc: dict[str, list[float]] = {k: [] for k in TIMED}
    load: list[list[float]] = []
    ref = None if args.no_open_lth else open_lth.prepare(args.ref_root)
    for i in range(args.timing_repeats):
        load.append([round(x, 2) for x in os.getloadavg()])
        runs = {"ours": time_ours(train_fn, args.steps)}
        if ref is not None:
            for mode in ("standard", "loop"):
                runs[f"open_lth_{mode}"] = open_lth.run(mode, args.steps, ref=ref, threads=args.threads)
        for key, r in runs.items():
            wall[key].append(float(r["seconds"]))
            cpu[key].append(float(r["cpu_seconds"]))
            if "test_accuracy" in r:
                acc[key].append(float(r["test_accuracy"]))
        print(f"timing repeat {i} (load {load[-1]}): "
              + ", ".join(f"{k} {r['seconds']:.1f}s wall / {r['cpu_seconds']:.1f}s CPU" for k, r in runs.items()),
              flush=True)
    return {**{k: v for k, v in wall.items() if v}, "cpu": {k: v for k, v in cpu.items() if v},
            "test_accuracy": {k: v for k, v in acc.items() if v}, "loadavg": load,
            "reference": {"repo": "facebookresearch/open_lth", "commit": ref["commit"] if ref else None,
                          "patches": [{"file": f, "why": w} for f, _o, _n, w in open_lth.PATCHES]},
            "args": {"steps": args.steps, "threads": args.threads, "timing_repeats": args.timing_repeats},
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def main() -> None:
    args = parse_args()
    results_file = Path(args.out) / "lottery.json"
    if args.report_only:
        render(json.loads(results_file.read_text()), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.train_subset:
        train = train.subset(args.train_subset, seed=0)
    train_fn = ClassifierTrainFn(train.images, train.labels, TrainingConfig(), test=(test.images, test.labels))
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.skip_search:
        results["search"] = run_search(args, train_fn)
        results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["timing"] = run_timing(args, train_fn)
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "python": platform.python_version(),
    }
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
    render(results, Path(args.out))
    print(f"wrote {results_file}, lottery.md and the figure", flush=True)


# -- report ------------------------------------------------------------------------------------
LABELS = {
    ("init", "imp"): "IMP, rewind to init",
    ("early:500", "imp"): "IMP, rewind to it. 500",
    ("init", "random_reinit"): "random reinit (init mask)",
    ("init", "random_mask"): "random mask (init)",
    ("early:500", "random_reinit"): "random reinit (it.500 mask)",
    ("early:500", "random_mask"): "random mask (it.500)",
}


def _acc(record: dict, method: str) -> float | None:
    if method == "imp":
        return record["metrics"].get("accuracy")
    return record["controls"].get(method, {}).get("accuracy")


def collect(search: dict[str, list[dict]]) -> tuple[list[int], dict, dict]:
    """``(rounds, densities[round] -> (hidden, overall), acc[(strategy, method)][round] -> [per seed])``."""
    acc: dict[tuple[str, str], dict[int, list[float]]] = {}
    dens: dict[int, tuple[float, float]] = {}
    for key, records in search.items():
        strategy = key.rsplit("/", 1)[0]
        for rec in records:
            dens[rec["round"]] = (rec["layer_density"]["hidden.0.weight"], rec["density"])
            for method in METHODS:
                a = _acc(rec, method)
                if a is not None:
                    acc.setdefault((strategy, method), {}).setdefault(rec["round"], []).append(a)
    return sorted(dens), dens, acc


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{100 * mean:.2f} ± {50 * (max(values) - min(values)):.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def _table(rounds: list[int], dens: dict, acc: dict) -> list[str]:
    cols = [k for k in LABELS if k in acc]
    lines = [
        "| round | hidden density | overall density | " + " | ".join(LABELS[c] for c in cols) + " |",
        "|---:|---:|---:|" + "---:|" * len(cols),
    ]
    for r in rounds:
        cells = [_cell(acc[c].get(r)) for c in cols]
        lines.append(f"| {r} | {dens[r][0]:.4f} | {dens[r][1]:.4f} | " + " | ".join(cells) + " |")
    return lines


def _verdicts(rounds: list[int], dens: dict, acc: dict) -> list[str]:
    """Goal: at <= 15% density, IMP >= dense, and IMP - control > seed-to-seed noise."""
    out = []
    for strategy in STRATEGIES:
        imp = acc.get((strategy, "imp"), {})
        dense = statistics.fmean(imp.get(0, [math.nan]))
        for r in (r for r in rounds if r > 0 and dens[r][1] <= 0.15 and r in imp):
            mean, spread = statistics.fmean(imp[r]), max(imp[r]) - min(imp[r])
            words = [f"- **{LABELS[(strategy, 'imp')]}**, round {r} (density {dens[r][1]:.3f}): "
                     f"{100 * mean:.2f}% vs dense {100 * dense:.2f}% → "
                     f"{'matches or beats dense' if mean >= dense else 'BELOW dense'}"]
            for control in ("random_reinit", "random_mask"):
                c = acc.get((strategy, control), {}).get(r)
                if not c:
                    continue
                margin, noise = mean - statistics.fmean(c), max(spread, max(c) - min(c))
                verdict = "beats it by more than the noise" if margin > noise else "does NOT beat it by more than the noise"
                words.append(f"{control}: {100 * statistics.fmean(c):.2f}% (margin {100 * margin:+.2f} pt, "
                             f"seed-to-seed range {100 * noise:.2f} pt, {verdict})")
            out.append("; ".join(words) + ".")
    return out


def _timing(results: dict) -> list[str]:
    t = results.get("timing", {})
    steps = t.get("args", {}).get("steps") or results.get("args", {}).get("steps", 5000)
    cpu, acc = t.get("cpu", {}), t.get("test_accuracy", {})
    med = {k: statistics.median(t[k]) for k in TIMED if t.get(k)}
    cmed = {k: statistics.median(cpu[k]) for k in TIMED if cpu.get(k)}
    lines = [f"| trainer | runs | median wall s / {steps:,}-iteration run | × ours (wall) | median CPU s | "
             "× ours (CPU) | test accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"ours": "ours (ClassifierTrainFn, in-memory tensors, fused Adam)",
             "open_lth_standard": "open_lth lottery level: `PrunedModel` + `standard_train` (DataLoader + PIL "
                                  "transforms, test set before/after, checkpoints)",
             "open_lth_loop": "open_lth `train` loop alone (DataLoader, no callbacks)"}
    for key, label in names.items():
        if key not in med:
            continue
        c = f"{cmed[key]:.1f} | {cmed[key] / cmed['ours']:.2f}" if key in cmed and "ours" in cmed else "– | –"
        a = f"{100 * statistics.median(acc[key]):.2f}%" if acc.get(key) else "–"
        lines.append(f"| {label} | {len(t[key])} | {med[key]:.1f} | {med[key] / med['ours']:.2f} | {c} | {a} |")
    return lines + _timing_conditions(results, t, cpu) + _search_run_seconds(results, steps)


def _timing_conditions(results: dict, t: dict, cpu: dict) -> list[str]:
    """The load during the timing repeats and the per-repeat ratios."""
    lines = []
    if t.get("loadavg"):
        loads = [x[0] for x in t["loadavg"]]
        lines.append("")
        lines.append(f"Load average (1 min) at the start of each repeat: {', '.join(f'{x:.2f}' for x in loads)} "
                     f"on {results.get('machine', {}).get('cores', '?')} cores ({t.get('date', '')}). Wall time "
                     "counts the waiting for a core on the shared machine, CPU time does not; both ratios are "
                     "from the same run.")
    paired = [k for k in ("open_lth_standard", "open_lth_loop") if len(cpu.get(k, [])) == len(cpu.get("ours", []))]
    if paired and cpu.get("ours"):
        per = [f"{k.removeprefix('open_lth_')}: " + ", ".join(
            f"{w / wo:.2f}/{c / co:.2f}" for w, wo, c, co in zip(t[k], t["ours"], cpu[k], cpu["ours"], strict=True))
            for k in paired]
        lines.append(f"Per repeat, open_lth ÷ ours (wall/CPU): {'; '.join(per)}.")
    return lines


def _search_run_seconds(results: dict, steps: int) -> list[str]:
    """Median seconds per training run inside the search, scaled to ``steps`` iterations."""
    per_run: dict[str, list[float]] = {}
    for records in results.get("search", {}).values():
        for rec in records:
            per_run.setdefault("imp", []).append(rec["metrics"]["seconds"] / rec["metrics"]["steps"] * steps)
            for c, m in rec["controls"].items():
                per_run.setdefault(c, []).append(m["seconds"] / m["steps"] * steps)
    if not per_run:
        return []
    return ["", f"Inside the search (all runs, scaled to {steps:,} iterations; the machine was shared): "
            + ", ".join(f"{k} median {statistics.median(v):.1f} s over {len(v)} runs" for k, v in per_run.items())]


def _figure(rounds: list[int], dens: dict, acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"imp": "-o", "random_reinit": "--s", "random_mask": ":^"}
    for (strategy, method), by_round in acc.items():
        rs = [r for r in rounds if r in by_round]
        x = [100 * dens[r][1] for r in rs]
        y = [100 * statistics.fmean(by_round[r]) for r in rs]
        err = [[100 * (statistics.fmean(by_round[r]) - min(by_round[r])) for r in rs],
               [100 * (max(by_round[r]) - statistics.fmean(by_round[r])) for r in rs]]
        ax.errorbar(x, y, yerr=err, fmt=styles[method], ms=4, capsize=2, label=LABELS[(strategy, method)],
                    color="C0" if strategy == "init" else "C1", alpha=1.0 if method == "imp" else 0.7)
    ax.set_xscale("log")
    ticks = [100 * dens[r][1] for r in rounds]
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (% of the pruned layers, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-300-100 on Fashion-MNIST: IMP vs controls (mean, min/max over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = [
    "Notes:",
    "",
    "- Protocol: Adam (lr 1.2e-3), batch 60, Glorot-normal init with zero biases, 5,000 iterations per run "
    "(the paper trains LeNet for 50k iterations on MNIST), layer-wise pruning of 20% of the remaining weights "
    "per round for the two hidden layers and 10% for the output layer, 10 rounds. Rewinding to iteration 500 "
    "retrains iterations 500-4,999 (4,500 steps) from the weights captured at iteration 500 of the dense run.",
    "- Controls are trained exactly like the ticket of their round (same start iteration, data order and steps): "
    "`random reinit` keeps the ticket's mask with fresh Glorot weights; `random mask` keeps the per-layer counts "
    "with random positions and starts from the same (rewind) weights as the ticket.",
    "- Each seed fixes the initialisation, the data order (shared by all runs of that seed) and the controls' "
    "random draws. '±' is half the range over the 2 seeds, the only noise estimate 2 seeds allow.",
    "- open_lth: facebookresearch/open_lth @ 2ce732f, cloned fresh from the fetched snapshot and run by "
    "`benchmarks/_open_lth_reference.py` (`PYTHONPATH=. python benchmarks/_open_lth_reference.py --mode standard` "
    "runs it alone). Its `PATCHES` list every change, none in the training loop: `np.product` -> `np.prod` "
    "(removed from numpy 2); the DistributedDataParallel subclass's torch base dropped (MRO error on torch 2.x; "
    "unused on one CPU); a `fashionmnist` entry in the dataset registry. One file is added: a `fashionmnist` "
    "dataset class, their MNIST class reading the Debian idx files (same PIL + ToTensor + Normalize path). "
    "torchvision 0.28.0 is installed into the scratch directory with `--no-deps`; the index has only its CUDA "
    "build, whose C ops cannot load against the CPU torch, so their meta-kernel registration is skipped (open_lth "
    "uses only `transforms`). It runs with its own defaults otherwise (kaiming-normal init, `num_workers=0`, a "
    "checkpoint every epoch). 'lottery level' is what its lottery runner does per level: `PrunedModel` with an "
    "all-ones mask, then `standard_train` with `evaluate_every_epoch=False` (test set before and after, "
    "checkpoints; data loading included); 'loop' is `train.train` with no callbacks, i.e. its DataLoader-based "
    "loop alone.",
    "- Every process used 1 torch thread (ours and open_lth's subprocesses alike): the machine's 2 cores were "
    "shared with other engineers' jobs, and 2 OpenMP threads per process on an oversubscribed machine slowed "
    "small-matmul training by up to 10x in trials. Absolute wall seconds are therefore noisy; each run's CPU "
    "time (which leaves out waiting for a core) is recorded beside them, and both ratios are measured in the "
    "same run, alternating, with medians. An earlier table here (ours 20.8 s, open_lth 104.6 s) came from a "
    "driver that was never committed; this one is reproducible from the repository.",
    "- Our trainer: data held in memory as tensors, one permutation per epoch, each batch an `index_select` of "
    "that permutation, gradients masked and masks re-applied after every fused-Adam step (pruned weights "
    "stay exactly zero). torch.compile is not used: in a side measurement (LeNet, 1 thread, same shared "
    "machine) `torch.compile(model)` cost 39 s to compile and then ran 1,000 steps in 4.6 s and 4.1 s against "
    "8.4 s and 3.4 s eager (eager's first pair was slowed by the load): no reliable gain, and every test "
    "process would pay the compile.",
]


def render(results: dict, out: Path) -> None:
    """Write ``lottery.md`` and ``lottery_accuracy_vs_density.png`` into ``out``."""
    rounds, dens, acc = collect(results.get("search", {}))
    figure = out / "lottery_accuracy_vs_density.png"
    if rounds:
        _figure(rounds, dens, acc, figure)
    m, a = results.get("machine", {}), results.get("args", {})
    text = [
        "## Lottery Ticket: LeNet-300-100 on Fashion-MNIST",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/bench_lottery.py` "
        f"(seeds {a.get('seeds')}, {a.get('steps')} iterations per run, {a.get('rounds')} rounds, "
        f"{a.get('threads')} torch thread per process); the timing table below was re-measured alone with "
        "`PYTHONPATH=. python benchmarks/bench_lottery.py --skip-search`.",
        f"Machine: {m.get('cores')}-core AMD EPYC, no GPU, torch {m.get('torch')}, Python {m.get('python')}; "
        "shared with other engineers' jobs while the search ran (load average 3-7 on 2 cores).",
        "",
        "Accuracy on the 10k test set (%), mean ± half the seed-to-seed range. Round 0 is the dense network.",
        "",
        *_table(rounds, dens, acc),
        "",
        f"![accuracy vs density]({figure.name})",
        "",
        "Goal check (tickets at ≤ 15% density):",
        "",
        *_verdicts(rounds, dens, acc),
        "",
        "Seconds per training run (batch 60, full 60k training set, test evaluation at the end), timed in the "
        "same process run, alternating ours / open_lth standard / open_lth loop:",
        "",
        *_timing(results),
        "",
        *NOTES,
    ]
    (out / "lottery.md").write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
