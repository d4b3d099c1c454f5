"""SparseGPT solver speed and agreement with the authors' reference code, on real SmolLM2 layers.

For layer 15 of SmolLM2-135M, gate_proj (weight 1536x576) and down_proj (weight 576x1536), the
Hessian XᵀX of 2048 calibration rows (8 windows x 256 tokens of Emma, seed 0) is collected, then
``sparsegpt_prune`` and a transcription of IST-DASLab/sparsegpt ``fasterprune``
(tests/solvers/reference_fasterprune.py) prune the same weight with the same H, interleaved,
``--repeats`` times each. Reported: median wall and CPU (process) seconds and their ratios, the
peak extra memory of one call each (``benchmarks/_memory.py``: peak RSS above the RSS before the
call), and agreement of the outputs:

- nominal: both at the same sparsity (the reference prunes one weight more per block, plus ties);
- count-matched: ours asked for the reference's count per block (int(numel·s)+1), which must
  reproduce the reference's weights up to float32 rounding.

With ``--perplexity`` it instead runs a small end-to-end quality check on SmolLM2: calibration
16 windows x 128 tokens of Emma (seed 0), perplexity on the first 16 x 256 tokens of Pride and
Prejudice, for dense, magnitude, Wanda (one pass and sequential) and SparseGPT (sequential) at
50% and 2:4. (The full protocol of issue 4 is the flows' benchmark.)

Usage: python benchmarks/bench_sparsegpt.py [--repeats 5] [--threads N] [--synthetic] [--perplexity]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import peak_extra_mib  # noqa: E402

from pruning_core.calibration import collect_activation_stats  # noqa: E402
from pruning_core.masks.pattern import NM  # noqa: E402
from pruning_core.metrics import reconstruction_error  # noqa: E402
from pruning_core.solvers import sparsegpt_prune  # noqa: E402
from tests.solvers.reference_fasterprune import reference_fasterprune  # noqa: E402

LAYERS = ("model.layers.15.mlp.gate_proj", "model.layers.15.mlp.down_proj")


def real_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from benchmarks._smollm2 import emma_windows, load_smollm2

    model, tok = load_smollm2()
    ids = emma_windows(tok, 8, 256, seed=0)
    inner = [n.removeprefix("model.") for n in LAYERS]  # run model.model: no lm_head needed
    ctx = collect_activation_stats(model.model, [ids[i:i + 2] for i in range(0, 8, 2)], layers=inner,
                                   hessian=True, progress=False)
    return {n: (model.get_submodule(n).weight.detach().clone(), ctx.require_stats(i).xtx.float())
            for n, i in zip(LAYERS, inner, strict=True)}


def synthetic_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (rows, cols) in zip(LAYERS, [(1536, 576), (576, 1536)], strict=True):
        X = torch.randn(2048, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
        X += 0.3 * torch.randn(2048, cols, generator=g)
        out[name] = (torch.randn(rows, cols, generator=g) * 0.05, X.T @ X)
    return out


def timed(fn) -> tuple[float, float, object]:
    """``(wall seconds, CPU seconds, result)`` of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def bench(name: str, W: torch.Tensor, H: torch.Tensor, pattern, repeats: int) -> str:
    nm = pattern is not None
    ref_args = (0.5, 2, 4) if nm else (0.5, 0, 0)
    ours_t, ref_t, ours_c, ref_c = [], [], [], []
    for _ in range(repeats):  # interleave, to share the machine's noise
        t, c, (ours, keep) = timed(lambda: sparsegpt_prune(W, H, 0.5, pattern=pattern))
        ours_t.append(t)
        ours_c.append(c)
        t, c, ref = timed(lambda: reference_fasterprune(W, H, *ref_args))
        ref_t.append(t)
        ref_c.append(c)
    to, tr = statistics.median(ours_t), statistics.median(ref_t)
    _, mem_o = peak_extra_mib(lambda: sparsegpt_prune(W, H, 0.5, pattern=pattern))
    _, mem_r = peak_extra_mib(lambda: reference_fasterprune(W, H, *ref_args))
    co, cr = statistics.median(ours_c), statistics.median(ref_c)
    mask_agree = float((keep == (ref != 0)).float().mean())
    rel = float((ours - ref).norm() / ref.norm())
    err_o, err_r = reconstruction_error(W, ours, H), reconstruction_error(W, ref, H)
    if not nm:  # blocksize 64 divides both widths, so every block has the same numel
        numel = W.shape[0] * 64
        adj, _ = sparsegpt_prune(W, H, (int(numel * 0.5) + 1) / numel, blocksize=64)
        ref64 = reference_fasterprune(W, H, 0.5, blocksize=64)
        matched = f"{float((adj - ref64).abs().max()):.1e}"
    else:
        matched = f"{float((ours - ref).abs().max()):.1e}"
    shape = "x".join(map(str, W.shape))
    pat = "2:4" if nm else "50%"
    return (f"| {name.split('.')[-1]} {shape} | {pat} | {to:.3f} | {tr:.3f} | {to / tr:.2f} | "
            f"{co:.3f} | {cr:.3f} | {co / cr:.2f} | {mem_o:.1f} | {mem_r:.1f} | "
            f"{mask_agree:.5f} | {rel:.1e} | {matched} | {err_o:.4f} / {err_r:.4f} |")


def perplexity(model, tok, n: int = 16, length: int = 256) -> float:
    import gzip
    import math

    from benchmarks._smollm2 import shipped_text_path

    with gzip.open(shipped_text_path("pride_and_prejudice"), "rt", encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read()[:200_000])["input_ids"][: n * length]).view(n, length)
    nll = 0.0
    with torch.no_grad():
        for b in ids.split(4):
            nll += model(b, labels=b, use_cache=False).loss.item() * b.shape[0]
    return math.exp(nll / n)


def perplexity_check() -> None:
    from benchmarks._smollm2 import emma_windows, load_smollm2
    from pruning_core.methods import get_method
    from pruning_core.pruning import prune_module, prune_sequential

    _, tok = load_smollm2()
    batches = list(emma_windows(tok, 16, 128, seed=0).split(4))
    magnitude, wanda, sparsegpt = get_method("magnitude"), get_method("wanda"), get_method("sparsegpt")
    runs = {
        "dense": None,
        "magnitude 50% (one pass)": lambda m: prune_module(m, magnitude, magnitude.spec(0.5)),
        "wanda 50% (one pass)": lambda m: prune_module(
            m, wanda, wanda.spec(0.5), collect_activation_stats(m, batches, progress=False)),
        "wanda 50% (sequential)": lambda m: prune_sequential(m, batches, wanda, wanda.spec(0.5), progress=False),
        "sparsegpt 50% (sequential)": lambda m: prune_sequential(m, batches, sparsegpt, sparsegpt.spec(0.5),
                                                                 progress=False),
        "wanda 2:4 (sequential)": lambda m: prune_sequential(m, batches, wanda, wanda.spec(None, NM(2, 4)),
                                                             progress=False),
        "sparsegpt 2:4 (sequential)": lambda m: prune_sequential(
            m, batches, sparsegpt, sparsegpt.spec(None, NM(2, 4)), progress=False),
    }
    print("| model | perplexity | achieved sparsity | pruning s (wall) |")
    print("|---|---|---|---|")
    for label, fn in runs.items():
        model, _ = load_smollm2()
        t0 = time.perf_counter()
        result = fn(model) if fn else None
        seconds = time.perf_counter() - t0
        sparsity = result.achieved_sparsity if result else 0.0
        print(f"| {label} | {perplexity(model, tok):.2f} | {sparsity:.4f} | {seconds:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="random correlated inputs instead of SmolLM2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--perplexity", action="store_true", help="end-to-end perplexity check instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.perplexity:
        perplexity_check()
        return
    torch.manual_seed(0)
    problems = synthetic_problems() if args.synthetic else real_problems()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("| layer (weight) | pattern | ours wall s | ref wall s | ratio | ours CPU s | ref CPU s | ratio |"
          " ours peak extra MiB | ref peak extra MiB |"
          " mask agreement | rel. weight diff | max abs diff, count-matched | rel. output error ours / ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (W, H) in problems.items():
        for pattern in (None, NM(2, 4)):
            print(bench(name, W, H, pattern, args.repeats), flush=True)


if __name__ == "__main__":
    main()
