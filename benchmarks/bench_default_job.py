"""The Quick start job on a warm cache against one dense perplexity evaluation (issue 12 §7).

In one run on one machine, each measurement a fresh process (so both pay Python, torch and
transformers start-up):

1. ``warm``: ``prune run configs/default.yaml`` once into a scratch directory. It fills the
   caches a user's second job finds: the SmolLM2 directory converted from the wheel and the
   dense perplexity on the evaluation windows. Reported, not compared.
2. ``dense``: one perplexity evaluation of SmolLM2 on the default job's evaluation windows
   (load the model, cut the windows, evaluate): what any job must at least do once.
3. ``job``: ``prune run`` of the default config with a calibration seed the cache has not seen
   (a new job hash, so nothing resumes), into a fresh output directory and MLflow store.

Steps 2 and 3 repeat ``--repeats`` times, alternating; the table gives medians and the ratio
job / dense (goal <= 2.5). Peak RSS of each process comes from ``ru_maxrss`` of its children.

    python benchmarks/bench_default_job.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRUNE = Path(sys.executable).with_name("prune")


def _timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one child process (measured by a fresh wrapper process,
    whose only child it is, so ``RUSAGE_CHILDREN`` is that child's own peak)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--measure", *cmd], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), **json.loads(done.stdout.strip().splitlines()[-1])}


def measure(cmd: list[str]) -> None:
    """``--measure``: run ``cmd``, then print its peak RSS as the last line (JSON)."""
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_mib": round(peak_kib / 1024)}))


def _config(work: Path, seed: int) -> Path:
    """configs/default.yaml with calibration seed ``seed`` (a job the caches have not seen)."""
    text = (REPO / "configs" / "default.yaml").read_text().replace("seed: 0", f"seed: {seed}")
    path = work / f"default-seed{seed}.yaml"
    path.write_text(text)
    return path


def dense_eval() -> None:
    """Step 2, in the child process: load SmolLM2, cut the default evaluation windows, evaluate."""
    from flows.jobs import load_config
    from pruning_core.lm import evaluation_windows, load_causal_lm, load_text, perplexity, tokenize_corpus
    from pruning_core.lm.smollm2 import smollm2_dir

    ev = load_config(REPO / "configs" / "default.yaml").evaluation
    model, tokenizer = load_causal_lm(smollm2_dir(), device="cpu")
    windows = evaluation_windows(tokenize_corpus(tokenizer, load_text(ev.text)), ev.num_windows, ev.window_length)
    print(json.dumps({"perplexity": perplexity(model, windows, batch_size=ev.batch_size)}))


def _env(work: Path, tag: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow-{tag}.db", "HF_HUB_OFFLINE": "1",
            "PREFECT_HOME": str(work / f"prefect-{tag}")}


def run(repeats: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench_default_job_"))
    rows: dict[str, Any] = {"warm": _timed([str(PRUNE), "run", str(_config(work, 0)), "--output-dir",
                                            str(work / "warm")], _env(work, "warm"))}
    dense, job = [], []
    for i in range(repeats):
        dense.append(_timed([sys.executable, __file__, "--dense-eval"], _env(work, f"d{i}")))
        job.append(_timed([str(PRUNE), "run", str(_config(work, 100 + i)), "--output-dir", str(work / f"job{i}")],
                          _env(work, f"j{i}")))
    for name, samples in (("dense", dense), ("job", job)):
        rows[name] = {"wall_s": statistics.median(s["wall_s"] for s in samples),
                      "peak_rss_mib": max(s["peak_rss_mib"] for s in samples),
                      "samples": [s["wall_s"] for s in samples]}
    rows["ratio"] = round(rows["job"]["wall_s"] / rows["dense"]["wall_s"], 2)
    summary = json.loads((work / "job0" / "summary.json").read_text())
    rows["job_seconds"] = summary.get("seconds")
    rows["machine"] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:  # the wrapper of _timed: everything after it is the command
        measure(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default_job.json")
    args = parser.parse_args()
    if args.dense_eval:
        dense_eval()
        return

    rows = run(args.repeats)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"| | median wall s | peak RSS MiB |\n|---|---:|---:|\n"
          f"| one dense perplexity evaluation | {rows['dense']['wall_s']:.1f} | {rows['dense']['peak_rss_mib']} |\n"
          f"| default job, warm cache | {rows['job']['wall_s']:.1f} | {rows['job']['peak_rss_mib']} |\n"
          f"ratio job / dense: {rows['ratio']} (goal <= 2.5); stages: {rows['job_seconds']}")


if __name__ == "__main__":
    main()
