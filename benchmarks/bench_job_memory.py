"""Benchmark: peak RSS and wall time of the one-shot job (``prune run``) at several depths of one width.

Issue 13 §3 and its "Done means": Wanda 50% and SparseGPT 50% on synthetic bfloat16 Llamas of one
width at 8, 16 and 32 layers, peak memory independent of depth beyond one block; and a 7 B shape
(hidden 4096, intermediate 11008, 32 layers, ~13.5 GB on disk) pruned with Wanda with peak RSS
≤ 4 GiB. Each model is written by ``scripts/make_synthetic_llama.py`` (SmolLM2's tokenizer), then
each method runs the real job (``flows.cli.main(["run", ...])``: Prefect, MLflow on sqlite, dense
and pruned perplexity, calibration, pruning, the pruned model written in bf16) in a fresh
interpreter that reports its own peak RSS (``VmHWM``: file pages of the memory-mapped shards it
touched included) and its CPU seconds. Models are deleted after use unless ``--keep``.

Methods in their natural mode: Wanda one pass; SparseGPT sequential (block i calibrated on the
pruned blocks < i). The inference-speed stage is off (it is the one stage that loads models whole
and is skipped by the job itself when they would not fit); MLflow model logging is off.

    python benchmarks/bench_job_memory.py --layers 8 16 32 --methods wanda sparsegpt
    python benchmarks/bench_job_memory.py --hidden 4096 --intermediate 11008 --heads 32 --layers 32 \
        --methods wanda --windows 4 --length 128 --eval-windows 2 --tag 7b
    python benchmarks/bench_job_memory.py --tables
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "job_memory.json"
CHILD = r"""
import os, re, sys, time
from pathlib import Path
from flows.runtime import configure_environment
configure_environment()
from flows.cli import main
start = time.perf_counter()
code = main(["run", sys.argv[1], "--output-dir", sys.argv[2]])
wall = time.perf_counter() - start
peak = int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
t = os.times()
print("RESULT", peak, round(wall, 1), round(t.user + t.system, 1), file=sys.stderr)
raise SystemExit(code)
"""
METHODS = {"wanda": {"method": "wanda", "mode": "one_pass"}, "sparsegpt": {"method": "sparsegpt", "mode": "sequential"}}


def synthesize(directory: Path, layers: int, args: argparse.Namespace) -> float:
    """Write the synthetic model; returns its GB on disk."""
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_llama.py"), str(directory), "--hidden",
           str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--layers", str(layers)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9


def job_config(model: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    m = METHODS[method]
    return {"job": "oneshot", "name": f"{method}-{model.name}", "model": str(model), "method": m["method"],
            "sparsity": 0.5, "device": "cpu",
            "calibration": {"num_windows": args.windows, "window_length": args.length, "batch_size": 4,
                            "mode": m["mode"]},
            "evaluation": {"num_windows": args.eval_windows, "window_length": args.length, "batch_size": 2,
                           "error_windows": min(2, args.windows), "speed": False},
            "tracking": {"log_model": False}}


def run_job(model: Path, method: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``prune run`` in a fresh interpreter: peak RSS, wall and CPU seconds, the summary's numbers."""
    config, out = work / f"{method}.yaml", work / f"run-{method}"
    config.write_text(yaml.safe_dump(job_config(model, method, args)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config), str(out)], cwd=work, capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"prune run failed for {model.name}/{method}:\n{proc.stderr[-4000:]}")
    peak, wall, cpu = re.search(r"^RESULT (\d+) ([\d.]+) ([\d.]+)$", proc.stderr, re.M).groups()
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"peak_mib": round(int(peak) / 2**20), "wall_s": float(wall), "cpu_s": float(cpu),
            "sparsity": summary.get("sparsity"), "ppl_dense": summary.get("perplexity_before"),
            "ppl_pruned": summary.get("perplexity_after")}


def block_mib(model: Path) -> float:
    from pruning_core.lm.shards import CheckpointLayout

    tensors = CheckpointLayout.read(model).tensors
    return sum(e.nbytes for n, e in tensors.items() if n.startswith("model.layers.0.")) / 2**20


def measure_depth(layers: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-job-{layers}-", dir=root))
    model = work / f"llama-{args.hidden}x{layers}"
    try:
        gb = synthesize(model, layers, args)
        row: dict[str, Any] = {"layers": layers, "disk_gb": round(gb, 2), "block_mib": round(block_mib(model), 1)}
        for method in args.methods:
            row[method] = run_job(model, method, work, args)
            print(f"{layers} layers ({gb:.2f} GB) {method}: {row[method]}", flush=True)  # noqa: T201
        return row
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def tables(data: dict[str, Any]) -> str:
    lines = ["| run | layers | GB on disk | one block MiB | method | peak RSS MiB | wall s | CPU s | sparsity |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for tag, run in data.items():
        for row in run["rows"]:
            for method in run["methods"]:
                r = row[method]
                lines.append(f"| {tag} | {row['layers']} | {row['disk_gb']:.2f} | {row['block_mib']:.0f} | {method} | "
                             f"{r['peak_mib']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['sparsity']} |")
    return "\n".join(lines)


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--tag", default=None, help="result key (default: the width)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tables", action="store_true")
    args = parser.parse_args()
    if args.tables:
        print(tables(_load()))  # noqa: T201
        return
    tag = args.tag or f"hidden{args.hidden}"
    start = time.perf_counter()
    rows = [measure_depth(layers, args, args.root) for layers in args.layers]
    data = _load()  # read again: another run may have written its rows meanwhile
    data[tag] = {"shape": [args.hidden, args.intermediate, args.heads], "methods": args.methods, "rows": rows,
                 "calibration": [args.windows, args.length], "eval_windows": args.eval_windows,
                 "seconds": round(time.perf_counter() - start), "date": time.strftime("%Y-%m-%d")}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(tables({tag: data[tag]}))  # noqa: T201


if __name__ == "__main__":
    main()
