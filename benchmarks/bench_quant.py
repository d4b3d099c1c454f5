"""Weight-only quantization of SmolLM2-135M with the pruning Hessians: GPTQ vs round-to-nearest.

Issue 15 §2. Protocol (the one-shot benchmark's): calibration = 64 windows x 256 tokens of Emma
at random starts (seed 0), in batches of 8; evaluation = perplexity on the first 64 x 256 tokens of
Pride and Prejudice (dense 28.93). Every Linear of the decoder blocks is quantized (the head is
tied to the embeddings and stays dense). GPTQ and the pruning solvers run sequentially: block i
is calibrated (``XᵀX``) on inputs computed through the already quantized/pruned blocks 0..i-1, as
the GPTQ and SparseGPT references do. RTN needs no calibration.

Rows, each in its own process (peak RSS per row), all in one run:

* ``dense``;
* ``w4g64-{rtn,gptq}``: 4 bits, groups of 64 (not 128: see ``W4`` below), symmetric (W4A16);
  ``w8-{rtn,gptq}``: 8 bits per output channel, symmetric (W8A16);
* ``sparsegpt50-w4-{rtn,joint}`` and ``sparsegpt24-w4-{rtn,joint}``: ``rtn`` = SparseGPT (50% /
  2:4, sequential) then RTN of the kept weights (also reports the pruned-only perplexity);
  ``joint`` = SparseGPT + GPTQ in one sequential pass (SparseGPT §3.5);
* ``wanda50-w4-{rtn,gptq}``: Wanda 50% per-row masks (sequential), weights pruned, then RTN; or
  each layer's Wanda mask then GPTQ keeping it exactly, on the same block's Hessian.

Every GPTQ row calls :func:`pruning_core.pruning.prune_and_quantize`, the library call the one-shot
job's ``quantization.joint`` makes (in its sequential calibration mode); quantization alone is its
magnitude method at sparsity 0, as in the job.

``seconds`` = the compression procedure (calibration passes + solves), without loading and
evaluation; ``peak_rss_mib`` = the row process's ``ru_maxrss``; ``zero_fraction`` = zeros among the
quantized weights (pruned ones, and kept ones that round to 0).

    nice -n 10 python benchmarks/bench_quant.py --resume > /tmp/bench_quant.log 2>&1
    python benchmarks/bench_quant.py --tables
    nice -n 10 python benchmarks/bench_quant.py --layers   # quick: layer-level errors, blocks 0-1

``--layers`` (minutes, not hours): the relative output error ``Σ‖(W - Ŵ)X‖² / Σ‖WX‖²`` over the
Linear layers of blocks 0 and 1 on the same calibration windows (dense inputs), every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quant.json"
# SmolLM2-135M's hidden size 576 is not a multiple of 128 (4.5 groups): q/k/v/gate/up cannot be
# stored with groups of 128 in pack-quantized (compressed-tensors and vLLM's kernels need whole
# groups), so the 4-bit rows use groups of 64 (576 = 9 x 64, 1536 = 24 x 64).
W4, W8 = {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": -1}


@dataclass(frozen=True)
class Row:
    id: str
    setting: str
    method: str  # dense | rtn | gptq
    spec: dict[str, Any] | None = None
    prune: str | None = None  # None | sparsegpt | wanda
    pattern: str = "unstructured"  # or "2:4"


ROWS = [
    Row("dense", "dense", "dense"),
    Row("w4g64-rtn", "W4 g64", "rtn", W4), Row("w4g64-gptq", "W4 g64", "gptq", W4),
    Row("w8-rtn", "W8 per-channel", "rtn", W8), Row("w8-gptq", "W8 per-channel", "gptq", W8),
    Row("sparsegpt50-w4-rtn", "SparseGPT 50% + W4 g64", "rtn", W4, "sparsegpt"),
    Row("sparsegpt50-w4-joint", "SparseGPT 50% + W4 g64", "gptq", W4, "sparsegpt"),
    Row("sparsegpt24-w4-rtn", "SparseGPT 2:4 + W4 g64", "rtn", W4, "sparsegpt", "2:4"),
    Row("sparsegpt24-w4-joint", "SparseGPT 2:4 + W4 g64", "gptq", W4, "sparsegpt", "2:4"),
    Row("wanda50-w4-rtn", "Wanda 50% + W4 g64", "rtn", W4, "wanda"),
    Row("wanda50-w4-gptq", "Wanda 50% + W4 g64", "gptq", W4, "wanda"),
]


# --------------------------------------------------------------------------- one row (child process)
def _data(tokenizer) -> tuple[list[torch.Tensor], torch.Tensor]:
    from pruning_core.lm import calibration_windows, evaluation_windows, load_text, tokenize_corpus

    cal = calibration_windows(tokenize_corpus(tokenizer, load_text("emma")), 64, 256, seed=0)
    ev = evaluation_windows(tokenize_corpus(tokenizer, load_text("pride_and_prejudice")), 64, 256)
    return list(cal.split(8)), ev


def _linears(model) -> dict[str, torch.nn.Linear]:
    from pruning_core.calibration import find_decoder_blocks

    path, _ = find_decoder_blocks(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(path + ".")}


def _sequential(model, batches, layer_fn) -> None:
    """``layer_fn(name, module, stats)`` on every Linear of every block, block by block."""
    from tqdm import tqdm

    from pruning_core.calibration import calibrate_block, capture_block_inputs, find_decoder_blocks, run_block
    from pruning_core.calibration.capture import select_linear_layers

    path, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, batches, progress=False)
    for i, block in enumerate(tqdm(blocks, desc="blocks", unit="block")):
        prefix = f"{path}.{i}."
        ctx = calibrate_block(block, inputs, hessian=True, prefix=prefix)
        for name, module in select_linear_layers(block).items():
            layer_fn(prefix + name, module, ctx.require_stats(prefix + name))
        inputs = run_block(block, inputs)


def _pattern(row: Row) -> tuple[float, Any]:
    from pruning_core.masks.pattern import NM

    return (0.5, NM(2, 4)) if row.pattern == "2:4" else (0.5, None)


def _spec(row: Row):
    """The row's method and SparsitySpec (quantization alone: magnitude at sparsity 0)."""
    from pruning_core.masks import SparsitySpec
    from pruning_core.methods import get_method

    method = get_method(row.prune or "magnitude")
    sparsity, pattern = _pattern(row) if row.prune else (0.0, None)
    return method, SparsitySpec.parse(sparsity, pattern or "unstructured", default_scope=method.default_scope)


def _prune(row: Row, model, batches) -> dict[str, torch.Tensor]:
    """Prune in place, sequentially (SparseGPT, or Wanda per-row masks); the masks."""
    masks: dict[str, torch.Tensor] = {}
    method, spec = _spec(row)

    def layer(name, module, stats):
        module.weight.data, masks[name] = method.prune_weight(module.weight.detach(), stats, spec, name=name)
    _sequential(model, batches, layer)
    return masks


def _quantize(row: Row, model, batches, masks) -> dict[str, Any]:
    """RTN of every (pruned) Linear, or the job's joint prune + GPTQ sequentially (one pass)."""
    from pruning_core.pruning.quantize import prune_and_quantize
    from pruning_core.quant import QuantSpec, quantize_rtn

    spec, quantized = QuantSpec(**row.spec), {}
    if row.method == "rtn":
        for name, module in _linears(model).items():
            quantized[name] = quantize_rtn(module.weight, spec, mask=masks.get(name), name=name)
            module.weight.data = quantized[name].dequantize(module.weight.dtype)
        return quantized
    method, sparsity = _spec(row)

    def layer(name, module, stats):
        result = prune_and_quantize(method, module.weight.detach(), stats, sparsity, spec, name=name)
        module.weight.data = result.quantized.dequantize(module.weight.dtype)
        quantized[name] = result.quantized
    _sequential(model, batches, layer)
    return quantized


def _export_bytes(model, quantized) -> int:
    from pruning_core.quant import save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        out = save_quantized(model, quantized, Path(tmp) / "q")
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run_row(row: Row) -> dict[str, Any]:
    from pruning_core.lm import load_causal_lm, perplexity, smollm2_dir

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(smollm2_dir(), dtype=torch.float32, device="cpu")
    batches, ev = _data(tokenizer)
    result: dict[str, Any] = {"id": row.id, "setting": row.setting, "method": row.method}
    start = time.perf_counter()
    masks = _prune(row, model, batches) if row.prune and row.method == "rtn" else {}  # GPTQ rows prune inside
    seconds = time.perf_counter() - start
    if masks:  # the pruned model before quantization
        result["pruned_perplexity"] = perplexity(model, ev, progress=False)
    start = time.perf_counter()
    quantized = _quantize(row, model, batches, masks) if row.method != "dense" else {}
    result["seconds"] = round(seconds + time.perf_counter() - start, 1)
    result["perplexity"] = perplexity(model, ev, progress=False)
    if row.id == "w4g64-gptq":
        result["export_mib"] = round(_export_bytes(model, quantized) / 2**20, 1)
    weights = [m.weight for m in _linears(model).values()]
    result["zero_fraction"] = round(1 - sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights), 4)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def layer_errors(num_blocks: int = 2) -> dict[str, float]:
    """Relative output error per setting over the Linear layers of the first blocks (dense inputs)."""
    from pruning_core.calibration import calibrate_block, capture_block_inputs, find_decoder_blocks, run_block
    from pruning_core.calibration.capture import select_linear_layers
    from pruning_core.lm import load_causal_lm, smollm2_dir

    model, tokenizer = load_causal_lm(smollm2_dir(), dtype=torch.float32, device="cpu")
    batches, _ = _data(tokenizer)
    path, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, batches, progress=False)
    totals: dict[str, list[float]] = {}
    for i in range(num_blocks):
        ctx = calibrate_block(blocks[i], inputs, hessian=True, prefix=f"{path}.{i}.")
        for name, module in select_linear_layers(blocks[i]).items():
            stats = ctx.require_stats(f"{path}.{i}.{name}")
            for key, new in _layer_variants(module.weight.detach(), stats).items():
                err = _output_error(module.weight.detach(), new, stats.xtx)
                totals.setdefault(key, [0.0, 0.0])[0] += err[0]
                totals[key][1] += err[1]
        inputs = run_block(blocks[i], inputs)
    return {key: e / n for key, (e, n) in totals.items()}


def _layer_variants(W: torch.Tensor, stats) -> dict[str, torch.Tensor]:
    from pruning_core.masks import SparsitySpec
    from pruning_core.methods import get_method
    from pruning_core.pruning.quantize import prune_and_quantize
    from pruning_core.quant import QuantSpec, quantize_rtn
    from pruning_core.solvers import gptq_quantize

    H, w4, out = stats.xtx, QuantSpec(**W4), {}
    for tag, spec in (("W4 g64", w4), ("W8 per-channel", QuantSpec(**W8))):
        out[f"{tag} RTN"] = quantize_rtn(W, spec).dequantize()
        out[f"{tag} GPTQ"] = gptq_quantize(W, H, spec)[0].dequantize()
    for tag, method, pattern in (("SparseGPT 50%", "sparsegpt", "unstructured"), ("SparseGPT 2:4", "sparsegpt", "2:4"),
                                 ("Wanda 50%", "wanda", "unstructured")):
        prune = get_method(method)
        sparsity = SparsitySpec.parse(0.5, pattern, default_scope=prune.default_scope)
        result = prune_and_quantize(prune, W, stats, sparsity, w4, baseline=True)
        out[f"{tag} only"] = prune.prune_weight(W, stats, sparsity)[0]
        out[f"{tag} + W4 g64 RTN"] = result.baseline.dequantize()
        out[f"{tag} + W4 g64 {'joint' if method == 'sparsegpt' else 'GPTQ (mask kept)'}"] = result.quantized.dequantize()
    return out


def _output_error(W: torch.Tensor, new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """``(‖(W - Ŵ)X‖², ‖WX‖²)`` from ``H = XᵀX``."""
    D, W64 = (W - new).double(), W.double()
    return float(torch.einsum("ij,jk,ik->", D, H, D)), float(torch.einsum("ij,jk,ik->", W64, H, W64))


# --------------------------------------------------------------------------- driver (parent process)
def _run_child(row: Row) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--row", row.id, "--json", str(out)], check=True)
        result = json.loads(out.read_text())
    result.update(process_seconds=round(time.perf_counter() - start, 1), load_before=round(load, 2),
                  load_after=round(os.getloadavg()[0], 2), finished=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    return result


def run_all(out: Path, ids: list[str], resume: bool) -> None:
    data = json.loads(out.read_text()) if resume and out.is_file() else {"rows": {}}
    data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    for row in ROWS:
        if row.id not in ids or (resume and row.id in data["rows"]):
            continue
        print(f"== {row.id}", flush=True)
        try:
            data["rows"][row.id] = _run_child(row)
        except subprocess.CalledProcessError as exc:  # record and go on with the other rows
            print(f"!! {row.id} failed: {exc}", flush=True)
            continue
        print(json.dumps(data["rows"][row.id]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tables(out: Path) -> str:
    rows = json.loads(out.read_text())["rows"]
    dense = rows.get("dense", {}).get("perplexity", float("nan"))
    lines = [f"Dense perplexity: {dense:.2f} ({rows.get('dense', {}).get('peak_rss_mib', '-')} MiB peak RSS)", "",
             "| setting | pruned only | RTN | GPTQ | GPTQ / RTN | RTN s | GPTQ s | RTN peak RSS MiB | GPTQ peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in dict.fromkeys(r.setting for r in ROWS if r.method != "dense"):
        rtn = next((rows[r.id] for r in ROWS if r.setting == setting and r.method == "rtn" and r.id in rows), {})
        opt = next((rows[r.id] for r in ROWS if r.setting == setting and r.method == "gptq" and r.id in rows), {})
        pruned = rtn.get("pruned_perplexity")
        ratio = opt["perplexity"] / rtn["perplexity"] if rtn and opt else float("nan")
        lines.append(f"| {setting} | {f'{pruned:.2f}' if pruned else '-'} | {rtn.get('perplexity', float('nan')):.2f} | "
                     f"**{opt.get('perplexity', float('nan')):.2f}** | {ratio:.3f} | {rtn.get('seconds', '-')} | "
                     f"{opt.get('seconds', '-')} | {rtn.get('peak_rss_mib', '-')} | {opt.get('peak_rss_mib', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", help="run one row in this process (internal)")
    parser.add_argument("--json", type=Path, help="where --row writes its result (internal)")
    parser.add_argument("--rows", default=",".join(r.id for r in ROWS), help="comma-separated row ids")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true", help="skip rows already in --out")
    parser.add_argument("--tables", action="store_true", help="print the Markdown table of --out")
    parser.add_argument("--layers", action="store_true", help="layer-level errors on blocks 0-1 (quick)")
    args = parser.parse_args()
    if args.row:
        row = next(r for r in ROWS if r.id == args.row)
        args.json.write_text(json.dumps(run_row(row)))
    elif args.tables:
        print(tables(args.out))
    elif args.layers:
        print("| setting | relative output error, blocks 0-1 |\n|---|---:|")
        for key, value in layer_errors().items():
            print(f"| {key} | {value:.3e} |")
    else:
        run_all(args.out, args.rows.split(","), args.resume)


if __name__ == "__main__":
    main()
