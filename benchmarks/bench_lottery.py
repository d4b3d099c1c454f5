"""Lottery Ticket quality and speed benchmark (issue 6 "Quality").

LeNet-300-100 on the full Fashion-MNIST (60k train / 10k test), the protocol of Frankle & Carbin
(2019) scaled to this machine: Adam, lr 1.2e-3, batch 60, 5,000 iterations per training run,
layer-wise pruning of 20% per round (hidden layers) and 10% (output layer), 10 rounds, 2 seeds.
IMP with rewinding to initialisation and to iteration k = 500, and both controls (random
re-initialisation, random mask of the same per-layer density) for each.

Speed: seconds per 5,000-iteration training run of our trainer versus facebookresearch/open_lth's
LeNet-300-100 training on the same data, timed in the same process run, alternating, medians.
open_lth must be checked out (and adapted to the local Fashion-MNIST files) at --open-lth.

The search state is saved after every round under --state-dir, so a killed run resumes.

    PYTHONPATH=. python benchmarks/bench_lottery.py --open-lth /tmp/open_lth --torchvision /tmp/tv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    p.add_argument("--open-lth", default=None, help="path of the adapted open_lth checkout")
    p.add_argument("--torchvision", default=None, help="PYTHONPATH entry holding torchvision for open_lth")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--skip-search", action="store_true")
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


def time_ours(train_fn: ClassifierTrainFn, steps: int) -> float:
    model = LeNet300100(generator=torch.Generator().manual_seed(0))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    t0 = time.perf_counter()
    train_fn(model, masks, TrainSpec(0, steps, seed=0))
    return time.perf_counter() - t0


def time_open_lth(args: argparse.Namespace, mode: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.torchvision, args.open_lth) if p)
    res = subprocess.run(
        [sys.executable, "time_lenet.py", str(args.steps), mode],
        cwd=args.open_lth, env=env, capture_output=True, text=True, check=True,
    )
    return float(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])


def run_timing(args: argparse.Namespace, train_fn: ClassifierTrainFn) -> dict[str, list[float]]:
    """Alternate ours / open_lth standard / open_lth bare loop, ``timing_repeats`` times."""
    times: dict[str, list[float]] = {"ours": [], "open_lth_standard": [], "open_lth_loop": []}
    for i in range(args.timing_repeats):
        times["ours"].append(time_ours(train_fn, args.steps))
        if args.open_lth:
            times["open_lth_standard"].append(time_open_lth(args, "standard"))
            times["open_lth_loop"].append(time_open_lth(args, "bare"))
        print(f"timing repeat {i}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items() if v), flush=True)
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.train_subset:
        train = train.subset(args.train_subset, seed=0)
    train_fn = ClassifierTrainFn(train.images, train.labels, TrainingConfig(), test=(test.images, test.labels))
    results_file = Path(args.out) / "lottery.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.skip_search:
        results["search"] = run_search(args, train_fn)
    results["timing"] = run_timing(args, train_fn)
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "python": platform.python_version(),
    }
    results["args"] = vars(args)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
    print(f"wrote {results_file}; run benchmarks/report_lottery.py to render tables and the figure", flush=True)


if __name__ == "__main__":
    main()
