"""How much of a magnitude-pruning result is decided by ties (SmolLM2-135M, the one-shot protocol).

The SmolLM2 weights we ship are dequantized from Q4_1: every block of 32 weights sits on a 16-level
grid, so equal magnitudes are common and a 2:4 group often has its 2nd and 3rd largest |w| equal.
Which of two equal weights is pruned is then a convention, not part of the algorithm: ours keeps
the lower index (a stable sort), the Wanda reference's ``torch.topk(largest=False)`` keeps
whichever its CPU kernel happens to return.

This script measures, on the decoder's 210 ``nn.Linear`` layers:

* how many comparison groups have a tie at the keep/prune boundary (2:4, and 50% per layer);
* the perplexity of magnitude 2:4 under several tie rules that are all exact 2:4 magnitude
  selections (each checked: per group, the multiset of kept |w| is identical): keep the lower
  index (ours), keep the higher index, the reference's ``topk(largest=False)`` selection, and
  random tie-breaks with three seeds.

The spread of those perplexities is the precision to which "magnitude 2:4" is defined on this
model. Evaluation: the first 64 x 256 tokens of Pride and Prejudice (the job's protocol).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ties.py --out benchmarks/results/ties.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pruning_core.lm import evaluation_windows, load_causal_lm, load_text, perplexity, tokenize_corpus
from pruning_core.masks.select import keep_nm
from pruning_core.pruning import target_layers

M, N_KEEP = 4, 2


def keep_lower(scores: torch.Tensor) -> torch.Tensor:
    """Ours: keep the 2 largest of every 4; equal scores keep the lower index."""
    return keep_nm(scores, N_KEEP, M)


def keep_higher(scores: torch.Tensor) -> torch.Tensor:
    """The mirror rule: flip each group, select with ours, flip back."""
    flip = lambda t: t.reshape(-1, M).flip(-1).reshape(t.shape)  # noqa: E731
    return flip(keep_nm(flip(scores), N_KEEP, M))


def reference_topk(scores: torch.Tensor) -> torch.Tensor:
    """locuslab/wanda ``prune_magnitude`` N:M: prune ``topk(group, M-N, largest=False)`` per group."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for ii in range(0, scores.shape[1], M):
        tmp = scores[:, ii:ii + M].float()
        pruned.scatter_(1, ii + torch.topk(tmp, M - N_KEEP, dim=1, largest=False)[1], True)
    return ~pruned


def random_ties(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Permute the positions of every group at random, select with ours, undo the permutation."""

    def select(scores: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        groups = scores.reshape(-1, M)
        perm = torch.argsort(torch.rand(groups.shape, generator=g), dim=1)
        keep_perm = keep_nm(torch.gather(groups, 1, perm), N_KEEP, M)
        keep = torch.empty_like(keep_perm)
        keep.scatter_(1, perm, keep_perm)
        return keep.reshape(scores.shape)

    return select


def kept_multiset_equal(scores: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether, in every group, the sorted kept scores of ``a`` and ``b`` are identical."""
    s = scores.reshape(-1, M)
    ka = torch.sort(torch.where(a.reshape(-1, M), s, -1.0), dim=1).values
    kb = torch.sort(torch.where(b.reshape(-1, M), s, -1.0), dim=1).values
    return bool(torch.equal(ka, kb))


def boundary_ties(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of 2:4 groups whose 2nd and 3rd largest are equal; fraction of weights equal to the
    50%-per-layer threshold (the k-th smallest |w|)."""
    groups = tie_groups = at_thresh = total = 0
    for s in scores.values():
        top = torch.sort(s.reshape(-1, M), dim=1, descending=True).values
        groups += top.shape[0]
        tie_groups += int((top[:, N_KEEP - 1] == top[:, N_KEEP]).sum())
        flat = s.flatten()
        thresh = torch.kthvalue(flat, flat.numel() // 2).values
        at_thresh += int((flat == thresh).sum())
        total += flat.numel()
    return {"nm_groups": groups, "nm_boundary_tie_fraction": tie_groups / groups,
            "unstructured50_weights_equal_to_threshold": at_thresh, "weights": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--windows", type=int, default=64, help="evaluation windows of 256 tokens")
    args = p.parse_args(argv)
    model, tok = load_causal_lm("smollm2", device="cpu")
    ev = evaluation_windows(tokenize_corpus(tok, load_text("pride_and_prejudice")), args.windows, 256)
    layers = target_layers(model)
    dense = {name: mod.weight.detach().clone() for name, mod in layers.items()}
    scores = {name: w.abs() for name, w in dense.items()}
    result: dict = {"ties": boundary_ties(scores), "rules": {}}
    rules = {"keep lower index (ours)": keep_lower, "keep higher index": keep_higher,
             "reference topk(largest=False)": reference_topk,
             **{f"random tie-break, seed {s}": random_ties(s) for s in (0, 1, 2)}}
    ours = {name: keep_lower(s) for name, s in scores.items()}
    for label, rule in rules.items():
        t0 = time.perf_counter()
        masks = {name: rule(s) for name, s in scores.items()}
        exact = all(int(m.sum()) * 2 == m.numel() and kept_multiset_equal(scores[n], m, ours[n])
                    for n, m in masks.items())
        agree = sum(int((m == ours[n]).sum()) for n, m in masks.items()) / sum(m.numel() for m in masks.values())
        with torch.no_grad():
            for name, mod in layers.items():
                mod.weight.copy_(dense[name] * masks[name])
        ppl = perplexity(model, ev, batch_size=8, progress=False)
        result["rules"][label] = {"perplexity": ppl, "same_kept_magnitudes_as_ours": exact,
                                  "mask_agreement_with_ours": agree,
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{label}: ppl {ppl:.2f}, exact selection {exact}, agreement {agree:.5f}", flush=True)
    ppls = [r["perplexity"] for r in result["rules"].values()]
    result["perplexity_min_max"] = [min(ppls), max(ppls)]
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
