"""One-shot LLM pruning quality and cost on SmolLM2-135M (issue 4 "Quality and speed").

Protocol: calibration = 64 windows x 256 tokens of Emma at random starts (seed 0); evaluation =
perplexity on the first 64 x 256 tokens of Pride and Prejudice, non-overlapping windows.

Two kinds of rows, each run in its own process (so that the peak memory is per row):

* ``job``: the real one-shot job, ``python -m flows.cli run CONFIG --output-dir DIR`` (what
  ``prune run`` does) on a config this script writes into the work directory. Read back:
  ``summary.json`` (perplexity before/after, achieved sparsity, seconds per stage); measured
  here: wall time of the whole process (Prefect server start included), CPU time and peak RSS
  from ``os.wait4`` (the kernel's ``ru_maxrss`` of the job process, i.e. the largest RSS any
  single process of the job reached), and a 0.5 s sampled peak of the summed RSS of the job's
  process tree (job + Prefect's server subprocess).
* ``ref``: the authors' reference code (locuslab/wanda ``prune_wanda``/``prune_magnitude``,
  IST-DASLab/sparsegpt ``llama_sequential``) on exactly our calibration windows, evaluated with
  ``pruning_core.lm.perplexity`` (see ``benchmarks/_oneshot_reference.py``).

Results are appended to a JSON file after every row; ``--resume`` skips rows already there.

    nohup python benchmarks/bench_oneshot.py --resume > /tmp/bench_oneshot.log 2>&1 &
    python benchmarks/bench_oneshot.py --tables          # Markdown tables from the JSON
    python benchmarks/bench_oneshot.py --skip-refs --dtype bfloat16 --only job-wanda-50-one_pass \
        --out benchmarks/results/oneshot_memory.json     # job rows with the dtype: override
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _oneshot_tables import render_tables  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "oneshot.json"
DEFAULT_WORK = Path("/tmp/bench_oneshot")
PATTERNS = {"50": (0.5, "unstructured"), "2:4": (None, "2:4"), "70": (0.7, "unstructured")}


@dataclass(frozen=True)
class Row:
    """One measurement: ``kind`` job (our flow) or ref (authors' code)."""

    id: str
    kind: str
    method: str
    pattern_key: str
    scope: str | None
    mode: str
    natural: bool
    reverse: bool = False  # ref rows: the same windows in reverse order (the reference's own float spread)
    dtype: str | None = None  # job rows: the job's ``dtype:`` override (None: as stored, float32)

    @property
    def sparsity(self) -> float | None:
        return PATTERNS[self.pattern_key][0]

    @property
    def pattern(self) -> str:
        return PATTERNS[self.pattern_key][1]


def job_rows() -> list[Row]:
    """Natural settings first (magnitude per layer; Wanda per row, one pass; SparseGPT sequential),
    then the other calibration mode of Wanda and SparseGPT. N:M patterns have no scope."""
    rows = []
    for key in PATTERNS:
        tag = key.replace(":", "of")
        unstructured = PATTERNS[key][1] == "unstructured"
        layer, row = ("layer", "row") if unstructured else (None, None)
        rows += [Row(f"job-magnitude-{tag}", "job", "magnitude", key, layer, "one_pass", True),
                 Row(f"job-wanda-{tag}-one_pass", "job", "wanda", key, row, "one_pass", True),
                 Row(f"job-sparsegpt-{tag}-sequential", "job", "sparsegpt", key, layer, "sequential", True),
                 Row(f"job-wanda-{tag}-sequential", "job", "wanda", key, row, "sequential", False),
                 Row(f"job-sparsegpt-{tag}-one_pass", "job", "sparsegpt", key, layer, "one_pass", False)]
    return rows


def ref_rows() -> list[Row]:
    """The reference procedures, compared with our job rows of the same method/pattern/mode; then
    Wanda and SparseGPT again on the calibration windows in reverse order (the reference's own
    numerical spread: same data and math, another floating-point summation order)."""
    rows, reversed_rows = [], []
    for key in PATTERNS:
        tag = key.replace(":", "of")
        layer, row = ("layer", "row") if PATTERNS[key][1] == "unstructured" else (None, None)
        rows += [Row(f"ref-magnitude-{tag}", "ref", "magnitude", key, layer, "one_pass", True),
                 Row(f"ref-wanda-{tag}", "ref", "wanda", key, row, "sequential", True),
                 Row(f"ref-sparsegpt-{tag}", "ref", "sparsegpt", key, layer, "sequential", True)]
        reversed_rows += [replace(r, id=f"{r.id}-reversed", reverse=True) for r in rows[-2:]]
    return rows + reversed_rows


def job_config(row: Row, tracking_uri: str) -> dict[str, Any]:
    """The YAML config of a job row (written into the work directory)."""
    cfg: dict[str, Any] = {
        "job": "oneshot", "name": row.id, "model": "smollm2", "method": row.method, "pattern": row.pattern,
        "calibration": {"text": "emma", "num_windows": 64, "window_length": 256, "seed": 0, "mode": row.mode},
        "evaluation": {"text": "pride_and_prejudice", "num_windows": 64, "window_length": 256},
        "tracking": {"experiment": "bench-oneshot", "tracking_uri": tracking_uri},
    }
    if row.sparsity is not None:
        cfg["sparsity"] = row.sparsity
    if row.dtype is not None:
        cfg["dtype"] = row.dtype
    if row.scope is not None:
        cfg["scope"] = row.scope
    return cfg


# --------------------------------------------------------------------------- measuring a process
class TreeRssSampler(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._halt = pid, interval, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; return exit code, wall/CPU seconds, peak RSS (wait4) and sampled tree RSS."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    tree_peak = sampler.stop()
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "peak_tree_rss_mib": round(tree_peak / 2**20, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "log": str(log)}


def child_env(work: Path, omp_wait_policy: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if omp_wait_policy:  # under load, OpenMP's spinning barriers waste the shared cores (results/lm.md)
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PREFECT_HOME", str(work / "prefect-home"))  # shared: one DB migration in all
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


# --------------------------------------------------------------------------- rows
def run_job(row: Row, work: Path, keep: bool, env: dict[str, str]) -> dict[str, Any]:
    job_dir = work / row.id
    shutil.rmtree(job_dir, ignore_errors=True)  # a row always runs from scratch (no job resume)
    job_dir.mkdir(parents=True)
    cfg_path = job_dir / f"{row.id}.yaml"
    cfg_path.write_text(yaml.safe_dump(job_config(row, f"sqlite:///{work / 'mlflow.db'}"), sort_keys=False))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_path), "--output-dir", str(job_dir / "run")]
    result = run_measured(cmd, job_dir, env, job_dir / "job.log")
    summary_path = job_dir / "run" / "summary.json"
    if result["returncode"] != 0 or not summary_path.exists():
        raise RuntimeError(f"{row.id}: job failed (exit {result['returncode']}); see {result['log']}")
    summary = json.loads(summary_path.read_text())
    result.update({k: summary[k] for k in ("method", "pattern", "scope", "calibration_mode", "target_sparsity",
                                           "sparsity", "parameters_targeted", "parameters_pruned",
                                           "perplexity_before", "perplexity_after", "seconds", "job_hash")})
    result["command"] = " ".join(["python", "-m", "flows.cli", "run", cfg_path.name, "--output-dir", "run"])
    result["config"] = job_config(row, "sqlite:///<work>/mlflow.db")
    result["masks"] = str(job_dir / "run" / "masks.safetensors")
    if not keep:  # the pruned model (517 MB) and its MLflow copy; masks and summaries stay
        shutil.rmtree(job_dir / "run" / "model", ignore_errors=True)
        shutil.rmtree(work / "mlartifacts", ignore_errors=True)
    return result


def run_ref(row: Row, work: Path, jobs: dict[str, Any], ref_root: Path, env: dict[str, str]) -> dict[str, Any]:
    ref_dir = work / row.id
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    ours = jobs.get(matching_job_id(row), {})
    out = ref_dir / "result.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "_oneshot_reference.py"), "--method", row.method,
           "--pattern", row.pattern, "--ref-root", str(ref_root), "--out", str(out)]
    if row.sparsity is not None:
        cmd += ["--sparsity", str(row.sparsity)]
    if ours.get("masks") and Path(ours["masks"]).exists():
        cmd += ["--our-masks", ours["masks"]]
    if row.reverse:
        cmd += ["--reverse-calibration"]
    result = run_measured(cmd, ref_dir, env, ref_dir / "ref.log")
    if result["returncode"] != 0 or not out.exists():
        raise RuntimeError(f"{row.id}: reference run failed (exit {result['returncode']}); see {result['log']}")
    result.update(json.loads(out.read_text()))
    result["compared_with"] = matching_job_id(row)
    return result


def matching_job_id(row: Row) -> str:
    """The job row with the same method, pattern and calibration mode as a reference row."""
    tag = row.pattern_key.replace(":", "of")
    if row.method == "magnitude":
        return f"job-magnitude-{tag}"
    return f"job-{row.method}-{tag}-sequential"


def ref_self_agreement(rows: dict[str, Any]) -> None:
    """For every reversed reference row: mask agreement with the in-order reference run.

    Both runs see the same tokens, so where their masks differ is the reference's own float noise."""
    from pruning_core.io.masks import load_masks

    for rid, r in rows.items():
        fwd = rows.get(rid.removesuffix("-reversed")) if r.get("reverse") else None
        if fwd is None or not all(x.get("ref_masks") and Path(x["ref_masks"]).exists() for x in (r, fwd)):
            continue
        a, b = load_masks(r["ref_masks"]), load_masks(fwd["ref_masks"])
        same = sum(int((a[k] == b[k]).sum()) for k in a)
        r["mask_agreement_ref_in_order"] = same / sum(a[k].numel() for k in a)


# --------------------------------------------------------------------------- results file
def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (appended after every row)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch directory for configs and runs")
    p.add_argument("--ref-root", type=Path, default=Path("/tmp/bench_oneshot_ref"),
                   help="where the patched reference checkouts go")
    p.add_argument("--resume", action="store_true", help="skip rows already in --out")
    p.add_argument("--only", default="", help="comma-separated substrings; run only matching row ids")
    p.add_argument("--skip-jobs", action="store_true")
    p.add_argument("--skip-refs", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep pruned models and MLflow artifacts")
    p.add_argument("--omp-wait-policy", default=None, choices=["PASSIVE", "ACTIVE"],
                   help="OMP_WAIT_POLICY for the child processes (default: unset, as prune run)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="job rows run with this dtype override (row ids get a -<dtype> suffix)")
    p.add_argument("--tables", action="store_true", help="print the Markdown tables from --out and exit")
    p.add_argument("--ref-agreement", action="store_true",
                   help="only fill in the in-order vs reversed reference mask agreement in --out")
    return p


def _run_rows(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Run every selected row (a job or a reference run), saving the results file after each."""
    env = child_env(args.work, args.omp_wait_policy)
    jobs = [] if args.skip_jobs else job_rows()
    if args.dtype:
        jobs = [replace(r, id=f"{r.id}-{args.dtype}", dtype=args.dtype) for r in jobs]
    rows = jobs + ([] if args.skip_refs else ref_rows())
    wanted = [s for s in args.only.split(",") if s]
    args.work.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if wanted and not any(s in row.id for s in wanted):
            continue
        if args.resume and row.id in results["rows"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {row.id} (load {os.getloadavg()[0]:.2f})", flush=True)
        if row.kind == "job":
            result = run_job(row, args.work, args.keep, env)
        else:
            result = run_ref(row, args.work, results["rows"], args.ref_root, env)
        results["rows"][row.id] = {**asdict(row), **result, "omp_wait_policy": args.omp_wait_policy,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        save_results(args.out, results)
        print(f"    ppl {result.get('perplexity_after')}, sparsity {result.get('sparsity')}, "
              f"wall {result['wall_s']} s, cpu {result['cpu_s']} s, peak RSS {result['peak_rss_mib']} MiB",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results = load_results(args.out)
    if args.tables:
        sys.stdout.write(render_tables(results))
        return 0
    if args.ref_agreement:
        ref_self_agreement(results["rows"])
        save_results(args.out, results)
        return 0
    results["machine"] = machine()
    _run_rows(args, results)
    ref_self_agreement(results["rows"])
    save_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
