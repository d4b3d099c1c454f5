"""Recovery distillation with fixed masks on SmolLM2-135M (issue 16): perplexity versus steps.

Protocol (``benchmarks/_quality.py``): the pruned model is SparseGPT 2:4 (sequential, the one-shot
job's 58.89) or Wanda 50% (one pass, per row, 54.08), calibrated on 64 x 256 tokens of Emma
(seed 0); it is then distilled from the dense model (KL of the logits, temperature 1, optionally
+ LM loss) on ``--windows`` Emma windows (seed 1; Emma shares no text with the evaluation
books), every pruned weight held at zero. Perplexity on the first 64 x 256 tokens of Pride and
Prejudice (dense 28.93) every ``--eval-every`` steps, and on Persuasion at the start and end.

Resumable: the pruned weights, the trainer state (every ``--checkpoint-every`` steps) and the curve
so far are kept in ``--work``; rerunning the same command continues a killed row. ``train_s``
is the time spent in training steps alone, ``wall_s`` includes the evaluations.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_recovery.py --rows wanda-50 sparsegpt-2of4 --resume
    PYTHONPATH=. python benchmarks/bench_recovery.py --tables
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality as Q  # noqa: E402

from pruning_core.calibration.capture import collect_activation_stats  # noqa: E402
from pruning_core.lm import calibration_windows  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.pruning import prune_module, prune_sequential  # noqa: E402
from pruning_core.recovery import RecoveryConfig, RecoveryTrainer, capture_masks  # noqa: E402

log = logging.getLogger("bench_recovery")
PRUNINGS = {"wanda-50": ("wanda", 0.5, "unstructured"), "sparsegpt-2of4": ("sparsegpt", None, "2:4")}


def prune_(model: Any, batches: list[torch.Tensor], which: str) -> None:
    method, sparsity, pattern = PRUNINGS[which]
    if method == "sparsegpt":
        sparsegpt = get_method("sparsegpt")
        prune_sequential(model, batches, sparsegpt, sparsegpt.spec(sparsity, pattern), progress=False, measure_memory=False)
    else:
        ctx = collect_activation_stats(model, batches, progress=False)
        wanda = get_method("wanda")
        prune_module(model, wanda, wanda.spec(sparsity, pattern), ctx, measure_memory=False)


def pruned_student(teacher: Any, batches: list[torch.Tensor], which: str, work: Path) -> tuple[Any, float]:
    """A pruned copy of ``teacher`` (its pruned weights cached in ``work``); seconds spent pruning."""
    student = copy.deepcopy(teacher)
    path = work / f"pruned-{which}.safetensors"
    if path.exists():
        student.load_state_dict(load_file(str(path)), strict=False)
        return student, 0.0
    _, seconds = Q.timed(lambda: prune_(student, batches, which))
    weights = {f"{n}.weight": student.get_submodule(n).weight.detach().contiguous() for n in capture_masks(student)}
    save_file(weights, str(work / "tmp.safetensors"))
    os.replace(work / "tmp.safetensors", path)
    return student, seconds


def row_id(which: str, args: argparse.Namespace) -> str:
    tag = f"{which}-s{args.steps}-lr{args.lr:g}-b{args.batch_size}-w{args.windows}x{args.window_length}"
    return tag + (f"-lm{args.lm_weight:g}" if args.lm_weight else "") + (f"-{args.schedule}" if args.schedule != "cosine" else "")


def make_trainer(student: Any, teacher: Any, tokenizer: Any, args: argparse.Namespace) -> RecoveryTrainer:
    """The recovery trainer on calibration-text windows (Emma, disjoint from the evaluation texts)."""
    train = calibration_windows(Q.text_tokens(tokenizer, "emma"), args.windows, args.window_length, seed=1)
    config = RecoveryConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup,
                            schedule=args.schedule, lm_weight=args.lm_weight, seed=0)
    return RecoveryTrainer(student, teacher, train, config)


def run_row(which: str, args: argparse.Namespace, teacher: Any, tokenizer: Any) -> dict[str, Any]:
    rid = row_id(which, args)
    work = args.work / rid
    work.mkdir(parents=True, exist_ok=True)
    batches = list(Q.calibration(tokenizer).split(8))
    student, prune_s = pruned_student(teacher, batches, which, args.work)
    evaluation = Q.evaluation(tokenizer, n=args.eval_windows)
    trainer = make_trainer(student, teacher, tokenizer, args)
    config = trainer.config
    progress_path, ckpt = work / "progress.json", work / "trainer.pt"
    progress: dict[str, Any] = {"curve": [], "train_s": 0.0, "train_cpu_s": 0.0, "eval_s": 0.0}
    if ckpt.exists():
        trainer.load_state_dict(torch.load(ckpt))
        progress = json.loads(progress_path.read_text())
    else:
        before, seconds = Q.timed(lambda: Q.perplexities(student, evaluation))
        progress.update({"before": before, "prune_s": round(prune_s, 1), "curve": [[0, before["pride_and_prejudice"], 0.0, 0.0]]})
    clock = {"last": time.perf_counter(), "cpu": Q.cpu_seconds()}

    def callback(step: int, loss: float, t: RecoveryTrainer) -> None:
        progress["train_s"] += time.perf_counter() - clock["last"]
        progress["train_cpu_s"] += Q.cpu_seconds() - clock["cpu"]
        if step % args.eval_every == 0 or step == args.steps:
            ppl, seconds = Q.timed(lambda: Q.perplexities(student, {"pride_and_prejudice": evaluation["pride_and_prejudice"]}))
            progress["curve"].append([step, ppl["pride_and_prejudice"], round(progress["train_s"], 1),
                                      round(progress["train_cpu_s"], 1)])
            progress["eval_s"] += seconds
            log.info("%s step %d: loss %.4f, perplexity %.2f (%.0f s training)", rid, step, loss,
                     ppl["pride_and_prejudice"], progress["train_s"])
        if step % args.checkpoint_every == 0 or step == args.steps:
            torch.save(t.state_dict(), work / "trainer.tmp")
            os.replace(work / "trainer.tmp", ckpt)
            progress_path.write_text(json.dumps(progress))
        clock["last"], clock["cpu"] = time.perf_counter(), Q.cpu_seconds()

    trainer.train(callback=callback)
    pruned = trainer.verify()
    after = Q.perplexities(student, evaluation)
    return {**progress, "after": after, "losses": trainer.losses, "pruned_weights": pruned,
            "config": {k: getattr(config, k) for k in ("steps", "lr", "batch_size", "warmup_steps", "schedule",
                                                        "lm_weight", "temperature", "grad_clip", "trainable")},
            "windows": [args.windows, args.window_length], "eval_windows": args.eval_windows}


def tables(results: Q.Results) -> str:
    lines = ["| row | before P&P | after P&P | gap closed | Persuasion before → after | train s | train CPU s | curve |",
             "|---|---:|---:|---:|---|---:|---:|---|"]
    for rid, r in sorted(results.data["rows"].items()):
        b, a = r["before"]["pride_and_prejudice"], r["after"]["pride_and_prejudice"]
        closed = (b - a) / (b - 28.934)
        curve = ", ".join(f"{c[0]}: {c[1]:.1f}" for c in r["curve"])
        lines.append(f"| {rid} | {b:.2f} | {a:.2f} | {closed:.2f} | {r['before']['persuasion']:.2f} → "
                     f"{r['after']['persuasion']:.2f} | {r['train_s']:.0f} | {r['train_cpu_s']:.0f} | {curve} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(PRUNINGS), choices=list(PRUNINGS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    parser.add_argument("--lm-weight", type=float, default=0.0)
    parser.add_argument("--windows", type=int, default=512, help="training windows drawn from Emma (seed 1)")
    parser.add_argument("--window-length", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Q.REPO / "benchmarks" / "results" / "recovery.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_recovery"))
    parser.add_argument("--resume", action="store_true")
    Q.add_threads_argument(parser)
    parser.add_argument("--tables", action="store_true")
    args = parser.parse_args()
    Q.start(args)
    results = Q.Results(args.out)
    if args.tables:
        print(tables(results))  # noqa: T201
        return
    args.work.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = Q.load_model()
    for which in args.rows:
        rid = row_id(which, args)
        if args.resume and results.has(rid):
            continue
        start = time.perf_counter()
        row = run_row(which, args, teacher, tokenizer)
        row.update({"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(Q.peak_rss_mib())})
        results.put(rid, row)
        log.info("%s: %s -> %s", rid, row["before"], row["after"])


if __name__ == "__main__":
    main()
