"""Run the authors' reference pruning code on SmolLM2-135M with our calibration windows.

Used by ``bench_oneshot.py`` (one process per row, for its peak memory); runnable alone:

    python benchmarks/_oneshot_reference.py --method wanda --pattern 2:4 --out /tmp/r.json

The references are fetched snapshots (github:locuslab/wanda @8e8fc87, github:IST-DASLab/sparsegpt
@147d215) at ``/work/.mirror/<owner>+<name>/repo``, cloned under ``--ref-root`` (never committed) and
patched there (``PATCHES``: exact string replacements, every one listed with its reason). Then:

* wanda ``lib.prune.prune_wanda`` / ``prune_magnitude`` (with its ``WrappedGPT``);
* sparsegpt ``llama.llama_sequential`` (with its ``SparseGPT``; ``true_sequential`` off, its default);

run on exactly our calibration windows (64 x 256 tokens of Emma, seed 0, cut by
``pruning_core.lm`` as the job does) instead of their C4 loader, and the pruned model is evaluated
with our ``pruning_core.lm.perplexity`` on the first 64 x 256 tokens of Pride and Prejudice.

Shims outside their files (no code of theirs changed by them):
* ``sys.modules["datasets"]``: a stub (HF ``datasets`` is not installed; only their C4/WikiText
  loaders use it, and those are replaced);
* ``lib.prune.get_loaders`` returns our windows as their list of ``(input [1, L], target)`` tuples;
* ``model.seqlen = 256``, ``model.hf_device_map = {}`` (set by their ``main.py`` / ``device_map="auto"``);
* ``llama.args``: their argparse namespace with its defaults, our sparsity/pattern and nsamples=64;
* rotary embeddings: transformers >= 4.48 computes ``position_embeddings`` once in ``LlamaModel``
  and the decoder layer no longer derives them from ``position_ids``; their Catchers record only
  ``attention_mask`` (and ``position_ids``). A forward pre-hook on every decoder layer fills in
  ``position_embeddings = model.model.rotary_emb(hidden, position_ids or arange(L))`` when the
  caller passes none, which is what the layer did itself in the transformers they were written for.
  (The decoder layer now returns a tensor, not a tuple; their ``layer(...)[0]`` then takes batch
  element 0 of a batch of 1, which is the same tensor.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MIRRORS = {"wanda": Path("/work/.mirror/locuslab+wanda/repo"), "sparsegpt": Path("/work/.mirror/IST-DASLab+sparsegpt/repo")}
PATCHES: dict[str, list[tuple[str, str, str, str]]] = {
    # repo: [(file, old, new, reason)]
    "wanda": [("lib/prune.py",
               "thresh = torch.sort(W_metric.flatten().cuda())[0][int(W.numel()*args.sparsity_ratio)].cpu()",
               "thresh = torch.sort(W_metric.flatten())[0][int(W.numel()*args.sparsity_ratio)]",
               "prune_magnitude sorts on the GPU; no CUDA here (same sort on the CPU)")],
    "sparsegpt": [("sparsegpt.py", "        torch.cuda.synchronize()\n",
                   "        if torch.cuda.is_available(): torch.cuda.synchronize()\n",
                   "fasterprune synchronizes CUDA for its timing print; raises on a CPU-only torch")],
}


def checkout(name: str, root: Path) -> tuple[Path, str]:
    """Clone the fetched snapshot into ``root/name`` (fresh) and apply ``PATCHES``; return (dir, commit)."""
    dest = root / name
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(MIRRORS[name]), str(dest)], check=True)
    commit = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    for file, old, new, _why in PATCHES[name]:
        path = dest / file
        text = path.read_text()
        if text.count(old) != 1:
            raise RuntimeError(f"patch for {name}/{file} does not apply (found {text.count(old)} times)")
        path.write_text(text.replace(old, new))
    return dest, commit


def add_rotary_shim(model) -> list:
    """Pre-hooks that supply ``position_embeddings`` to decoder layers called without them."""
    rotary = model.model.rotary_emb

    def pre_hook(_mod, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        kwargs["position_embeddings"] = rotary(hidden, position_ids=pos)
        return args, kwargs

    return [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in model.model.layers]


def protocol_windows(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and evaluation windows exactly as the job's ``prepare_inputs`` cuts them."""
    from pruning_core.lm import calibration_windows, evaluation_windows, load_text, tokenize_corpus

    cal = calibration_windows(tokenize_corpus(tokenizer, load_text("emma")), 64, 256, 0)
    ev = evaluation_windows(tokenize_corpus(tokenizer, load_text("pride_and_prejudice")), 64, 256)
    return cal, ev


def their_loader(windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Their calibration format: a list of ``(input [1, L], target [1, L])`` (target -100 but the last)."""
    out = []
    for w in windows:
        inp = w[None, :].clone()
        tar = inp.clone()
        tar[:, :-1] = -100
        out.append((inp, tar))
    return out


def run_wanda_repo(method: str, model, tokenizer, loader, sparsity: float, nm: tuple[int, int], root: Path) -> None:
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))  # stub, never called
    sys.path.insert(0, str(root / "wanda"))
    importlib.invalidate_caches()  # the checkout was created after the interpreter started
    import lib.prune as wprune  # noqa: PLC0415 - the patched reference checkout

    wprune.get_loaders = lambda *a, **k: (loader, None)
    args = SimpleNamespace(nsamples=len(loader), seed=0, sparsity_ratio=sparsity, use_variant=False)
    fn = wprune.prune_wanda if method == "wanda" else wprune.prune_magnitude
    fn(args, model, tokenizer, device=torch.device("cpu"), prune_n=nm[0], prune_m=nm[1])


def run_sparsegpt_repo(model, loader, sparsity: float, nm: tuple[int, int], root: Path) -> None:
    sys.path.insert(0, str(root / "sparsegpt"))
    importlib.invalidate_caches()
    sys.modules.setdefault("wandb", None)  # their try/except import: make it fail fast, as without wandb
    import llama  # noqa: PLC0415 - the patched reference checkout

    llama.args = SimpleNamespace(nsamples=len(loader), seed=0, percdamp=0.01, sparsity=sparsity, prunen=nm[0],
                                 prunem=nm[1], blocksize=128, gmp=False, wbits=16, minlayer=-1, maxlayer=1000,
                                 prune_only="", invert=False, true_sequential=False)
    llama.llama_sequential(model, loader, torch.device("cpu"))


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    from pruning_core.pruning import target_layers

    return target_layers(model)


def compare_masks(model, ours_path: str | None) -> dict:
    """Agreement of the reference's zero pattern with our job's masks (same layer names)."""
    if not ours_path:
        return {}
    from pruning_core.io.masks import load_masks

    ours = load_masks(ours_path)
    agree, total, per_layer = 0, 0, {}
    for name, module in decoder_linears(model).items():
        theirs = module.weight.detach() != 0
        same = int((theirs == ours[name].to(theirs.device)).sum())
        agree, total = agree + same, total + theirs.numel()
        per_layer[name] = same / theirs.numel()
    worst = sorted(per_layer.items(), key=lambda kv: kv[1])[:5]
    return {"mask_agreement": agree / total, "mask_agreement_worst_layers": worst}


def save_zero_pattern(model, path: Path) -> str:
    """The reference's keep masks (weight != 0) as our bit-packed masks file, for later comparisons."""
    from pruning_core.io.masks import save_masks

    save_masks(path, {name: m.weight.detach() != 0 for name, m in decoder_linears(model).items()})
    return str(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], required=True)
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M")
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--ref-root", type=Path, default=Path("/tmp/bench_oneshot_ref"))
    p.add_argument("--our-masks", default=None, help="masks.safetensors of our matching job (for agreement)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reverse-calibration", action="store_true",
                   help="feed the same calibration windows in reverse order (same math, another float "
                        "summation order): the reference's own numerical spread")
    return p


def _prune_with_reference(args: argparse.Namespace, repo: str, sparsity: float,
                          nm: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
    """Load SmolLM2, cut the protocol's windows and prune with the reference code; the model and
    what was measured on the way (seconds, windows, dense zeros)."""
    from pruning_core.lm import load_causal_lm

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2", device="cpu")
    model.seqlen, model.hf_device_map = 256, {}
    cal, ev = protocol_windows(tokenizer)
    windows_match = _windows_match(cal, ev, args.our_masks)
    if args.reverse_calibration:
        cal = cal.flip(0)
    seconds["prepare"] = time.perf_counter() - t0
    dense_zeros = sum(int((m.weight == 0).sum()) for m in decoder_linears(model).values())
    handles = add_rotary_shim(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        if repo == "wanda":
            run_wanda_repo(args.method, model, tokenizer, their_loader(cal), sparsity, nm, args.ref_root)
        else:
            run_sparsegpt_repo(model, their_loader(cal), sparsity, nm, args.ref_root)
    seconds["prune"] = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return model, {"seconds": seconds, "windows_match": windows_match, "dense_zeros": dense_zeros,
                   "nsamples": len(cal), "evaluation": ev}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pruning_core.lm import perplexity
    from pruning_core.masks.pattern import NM, SparsityPattern

    pattern = SparsityPattern.parse(args.pattern)
    nm = (pattern.m - pattern.n, pattern.m) if isinstance(pattern, NM) else (0, 0)  # theirs: n PRUNED of m
    sparsity = args.sparsity if args.sparsity is not None else float(pattern.theoretical_sparsity())
    repo = "sparsegpt" if args.method == "sparsegpt" else "wanda"
    _, commit = checkout(repo, args.ref_root)
    model, run = _prune_with_reference(args, repo, sparsity, nm)
    layers = decoder_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    numel = sum(m.weight.numel() for m in layers.values())
    t0 = time.perf_counter()
    ppl = perplexity(model, run["evaluation"], batch_size=8, progress=False)
    run["seconds"]["evaluate_pruned"] = time.perf_counter() - t0
    result = {"reference_repo": {"wanda": "locuslab/wanda", "sparsegpt": "IST-DASLab/sparsegpt"}[repo],
              "reference_commit": commit, "patches": [{"file": f, "why": why} for f, _o, _n, why in PATCHES[repo]],
              "function": {"wanda": "lib.prune.prune_wanda", "magnitude": "lib.prune.prune_magnitude",
                           "sparsegpt": "llama.llama_sequential"}[args.method],
              "their_args": {"sparsity": sparsity, "prune_n": nm[0], "prune_m": nm[1], "nsamples": run["nsamples"]},
              "reverse_calibration": args.reverse_calibration, "perplexity_after": ppl, "sparsity": zeros / numel,
              "parameters_targeted": numel, "parameters_pruned": zeros, "dense_zero_weights": run["dense_zeros"],
              "windows_identical_to_job": run["windows_match"],
              "seconds": {k: round(v, 3) for k, v in run["seconds"].items()}, **compare_masks(model, args.our_masks),
              "ref_masks": save_zero_pattern(model, args.out.with_name("ref_masks.safetensors"))}
    args.out.write_text(json.dumps(result, indent=1))
    return 0


def _windows_match(cal: torch.Tensor, ev: torch.Tensor, masks_path: str | None) -> bool | None:
    """Whether our windows equal the ones the matching job saved (``windows.safetensors`` beside its masks)."""
    if not masks_path or not (Path(masks_path).parent / "windows.safetensors").exists():
        return None
    from pruning_core.io.tensors import load_tensors

    saved = load_tensors(Path(masks_path).parent / "windows.safetensors", ["calibration", "evaluation"])
    return bool(torch.equal(saved["calibration"], cal) and torch.equal(saved["evaluation"], ev))


if __name__ == "__main__":
    raise SystemExit(main())
