"""Benchmark: peak RSS and wall time of the streaming engine at several depths of one width.

Issue 13 §3: memory must be bounded by the shell (embeddings, head) + one or two decoder blocks +
activations, independent of depth. For each ``--layers`` value a synthetic bfloat16 Llama of the
given width is written by ``scripts/make_synthetic_llama.py`` (SmolLM2's tokenizer, vocabulary
49152; deleted afterwards unless ``--keep``), then each workload runs in a fresh interpreter that
reports its own peak RSS (``VmHWM``) and wall time:

- ``perplexity``: :func:`pruning_core.lm.streaming_perplexity` on ``--windows`` x ``--length``
  tokens of Pride and Prejudice (float32 compute on CPU);
- ``wanda``: a streaming one-pass Wanda 50% (per output row): float64 ``ActivationStats`` hooks on
  every Linear of the block over ``--windows`` x ``--length`` tokens of Emma, scores
  ``|W| * ||X||``, the block written back in bfloat16 by :class:`pruning_core.lm.CheckpointWriter`;
- ``full`` (baseline, ``--baseline``): ``from_pretrained(dtype=float32)`` + ``perplexity`` on the
  same windows, i.e. holding the whole model (skipped above ``--baseline-max-gb`` of float32).

Ratios are against the shallowest depth measured in the same run. Never run it while other jobs
load the machine; the 7 B shape needs ~14 GB of free disk per depth:

    python benchmarks/bench_stream.py --hidden 1024 --intermediate 2816 --heads 16 --layers 8 16 32 --baseline
    python benchmarks/bench_stream.py --hidden 4096 --intermediate 11008 --heads 32 --layers 32 --windows 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import ctypes, json, re, sys, time
from pathlib import Path
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (as benchmarks/_memory.py)
ctypes.CDLL("libc.so.6").mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_stream import run_workload
start = time.perf_counter()
result = run_workload(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
status = Path("/proc/self/status").read_text()
peak = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
print(json.dumps({**result, "process_seconds": time.perf_counter() - start, "peak_bytes": peak}))
"""


def _windows(model: Path, book: str, windows: int, length: int):
    from pruning_core.lm import evaluation_windows, load_text, tokenize_corpus
    from pruning_core.lm.checks import offline_transformers

    tokenizer = offline_transformers().AutoTokenizer.from_pretrained(model, local_files_only=True)
    return evaluation_windows(tokenize_corpus(tokenizer, load_text(book)), windows, length, what=book)


def _wanda(model: Path, windows, batch_size: int) -> dict[str, float]:
    import contextlib

    import torch

    from pruning_core.calibration import ActivationStats
    from pruning_core.importance.wanda import wanda_scores
    from pruning_core.lm import CheckpointWriter, LayerStream, calibrate_blocks

    stats: dict[str, ActivationStats] = {}

    def observe(i, block, inputs):
        stack = contextlib.ExitStack()
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                acc = stats[name] = ActivationStats(m.in_features, name=name)
                handle = m.register_forward_hook(lambda mod, a, o, acc=acc: acc.update(a[0]))
                stack.callback(handle.remove)
        return stack

    def finish(i, block):
        with torch.no_grad():
            for name, m in block.named_modules():
                if isinstance(m, torch.nn.Linear):
                    scores = wanda_scores(m.weight, stats.pop(name).sum_sq)
                    drop = scores.argsort(dim=1, stable=True)[:, : m.in_features // 2]
                    m.weight.scatter_(1, drop, 0)
        return {"block": i}

    out = Path(tempfile.mkdtemp(prefix="bench-stream-out-", dir=model.parent)) / "pruned"
    start = time.perf_counter()
    stream = LayerStream(model, windows, batch_size=batch_size, head=False, progress=False)
    with CheckpointWriter(stream.reader, out) as writer:
        calibrate_blocks(stream, finish, observe=observe, sequential=False, writer=writer)
        writer.finish()
    seconds = time.perf_counter() - start
    shutil.rmtree(out.parent)
    return {"seconds": seconds}


def run_workload(name: str, model: Path, windows: int, length: int, batch_size: int) -> dict[str, float]:
    """Run one workload in this process (the child of :func:`measure`); ``seconds`` times the
    workload itself (model reading included, imports and tokenization not)."""
    if name == "wanda":
        return _wanda(model, _windows(model, "emma", windows, length), batch_size)
    tokens = _windows(model, "pride_and_prejudice", windows, length)
    import torch

    from pruning_core.lm import perplexity, streaming_perplexity
    from pruning_core.lm.checks import offline_transformers

    start = time.perf_counter()
    if name == "perplexity":
        ppl = streaming_perplexity(model, tokens, batch_size=batch_size, progress=False)
    else:
        full = offline_transformers().AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        ppl = perplexity(full, tokens, batch_size=batch_size, progress=False)
    return {"ppl": ppl, "seconds": time.perf_counter() - start}


def measure(name: str, model: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", CHILD, str(REPO), name, str(model), str(args.windows), str(args.length),
           str(args.batch_size)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthesize(directory: Path, layers: int, args: argparse.Namespace) -> tuple[float, float]:
    """Write the synthetic model; returns (parameters in billions, GB on disk)."""
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_llama.py"), str(directory), "--hidden",
           str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--layers", str(layers)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return size / 2 / 1e9, size / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workloads", nargs="+", default=["perplexity", "wanda"], choices=["perplexity", "wanda"])
    parser.add_argument("--baseline", action="store_true", help="also measure the whole-model float32 perplexity")
    parser.add_argument("--baseline-max-gb", type=float, default=8.0)
    parser.add_argument("--root", type=Path, default=None, help="where the synthetic models go (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    args = parser.parse_args()
    print(f"machine load {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; width hidden {args.hidden}, "
          f"intermediate {args.intermediate}, heads {args.heads}; {args.windows} x {args.length} tokens, "
          f"batch {args.batch_size}\n")
    print("| layers | params (B) | bf16 on disk (GB) | workload | peak RSS (MiB) | vs shallowest | wall (s) | result |")
    print("|---:|---:|---:|---|---:|---:|---:|---|")
    first: dict[str, float] = {}
    for layers in args.layers:
        directory = Path(tempfile.mkdtemp(prefix=f"synthetic-llama-{layers}-", dir=args.root)) / "model"
        start = time.perf_counter()
        params, gb = synthesize(directory, layers, args)
        print(f"<!-- wrote {directory} in {time.perf_counter() - start:.1f} s -->", flush=True)
        workloads = list(args.workloads)
        if args.baseline and params * 4 <= args.baseline_max_gb:
            workloads.append("full")
        for name in workloads:
            r = measure(name, directory, args)
            mib = r["peak_bytes"] / 2**20
            first.setdefault(name, mib)
            result = f"ppl {r['ppl']:.2f}" if "ppl" in r else "pruned + written"
            print(f"| {layers} | {params:.2f} | {gb:.2f} | {name} | {mib:.0f} | {mib / first[name]:.2f}x "
                  f"| {r['seconds']:.1f} | {result} |", flush=True)
        if not args.keep:
            shutil.rmtree(directory.parent)


if __name__ == "__main__":
    main()
