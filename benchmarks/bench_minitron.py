"""Minitron depth/width pruning quality on SmolLM2-135M (issue 5 "Quality").

Protocol (same as the one-shot job): calibration = 64 windows x 256 tokens of Emma at random
starts (torch.Generator seed 0); evaluation = perplexity on the first 64 x 256 tokens of Pride
and Prejudice (non-overlapping windows). Importance uses a prefix of the calibration windows
(``--bi-windows`` for Block Importance, ``--loss-windows`` for the layer-drop LM loss; width
importance uses all of them).

Rows:
- depth, k in {3, 6, 9} of 30 layers removed: BI one-shot, BI iterative, LM-loss drop
  (one-shot), last k layers, random k layers (``--random-seeds`` seeds, each reported);
- width: MLP 1536 -> 768, heads 9 -> 6 (KV groups 3 -> 2), both; ours (Minitron activation
  importance) against Torch-Pruning 1.6.1 (GroupMagnitudeImportance p=2 over its dependency
  groups, its ``examples/LLMs/prune_llm.py`` criterion) and weight-magnitude head scores sliced
  by our graph. Torch-Pruning's GQA head pruning removes query heads inside each KV group and
  never a KV group, so it cannot reach 6 heads in 2 KV groups; it is measured at 6 heads in 3 KV
  groups (one query head per group removed), next to ours at that same shape.

Torch-Pruning's head pruning runs on transformers 5.24 when its graph is traced with eager
attention and ``use_cache=False`` (``torch_pruning_heads_``): with SDPA its GQA head grouping
fails (``imp.view(num_heads, -1)`` on the KV heads' 3 x 64 channels). Its pruner roots each
attention group at a downstream node; asking its graph for the group of a ``q_proj`` directly
never returns on a GQA Llama (``benchmarks/tp_rope_hang.py``: the search cycles through RoPE).

Every pruned model's parameter count is checked against the prediction (the plan's
``predicted_num_parameters`` for our plans, ``ModelShape.num_parameters`` of the pruned config
for every row); a mismatch stops the run. ``predicted_params`` is recorded in each row.

    pip install --target /tmp/tp torch-pruning==1.6.1 --no-deps   # not a project dependency
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/tp:. nohup python benchmarks/bench_minitron.py \
        --out benchmarks/results/minitron.json > /tmp/bench_minitron.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from pruning_core.graph import StructuredPlan, apply_plan_, build_dependency_graph
from pruning_core.graph.hf import sync_config_
from pruning_core.lm import (
    calibration_windows,
    evaluation_windows,
    load_causal_lm,
    load_text,
    shipped_text_path,
    tokenize_corpus,
)
from pruning_core.lm import perplexity as lm_perplexity
from pruning_core.minitron import (
    Architecture,
    ModelShape,
    bi_iterative,
    collect_block_importance,
    collect_width_scores,
    decoder_structure,
    depth_plan,
    layer_drop_losses,
    select_one_shot,
    width_plan,
)
from pruning_core.minitron.width_scores import WidthScores

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("SMOLLM2_DIR", "/work/cache/smollm2"))  # else pruning_core.lm converts the wheel
log = logging.getLogger("bench_minitron")


# --------------------------------------------------------------------------- data and evaluation
def load_model_and_tokens(calib: int, evaluation: int, length: int):
    """Model, calibration windows [calib, length] (Emma, seed 0), evaluation windows [evaluation,
    length] (first tokens of Pride and Prejudice), through ``pruning_core.lm``."""
    model, tok = load_causal_lm(str(MODEL_DIR) if MODEL_DIR.is_dir() else None)
    emma = tokenize_corpus(tok, load_text(shipped_text_path("emma")))
    pride = tokenize_corpus(tok, load_text(shipped_text_path("pride_and_prejudice")))
    return model, calibration_windows(emma, calib, length, seed=0), evaluation_windows(pride, evaluation, length)


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return lm_perplexity(model, windows, batch_size=8, progress=False)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batches_of(windows: torch.Tensor, size: int = 8) -> list[torch.Tensor]:
    return [windows[i : i + size] for i in range(0, len(windows), size)]


def apply_checked(model: torch.nn.Module, plan: StructuredPlan) -> torch.nn.Module:
    """A pruned copy of ``model``; raises if its parameter count differs from the plan's prediction."""
    predicted = plan.predicted_num_parameters(model)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    if num_params(pruned) != predicted:
        raise RuntimeError(f"pruned model has {num_params(pruned):,} parameters; the plan predicted {predicted:,}")
    return pruned


def predicted_params(model: torch.nn.Module) -> int:
    """The analytic count of the model's (pruned) config, as the search predicts it."""
    return ModelShape.from_config(model.config).num_parameters(Architecture.from_config(model.config))


# --------------------------------------------------------------------------- baselines
def magnitude_head_scores(model: torch.nn.Module, structure) -> torch.Tensor:
    """[L, H] head scores from weights only: ||W_q rows||^2 + ||W_o cols||^2 + its KV rows / r
    (Torch-Pruning's GroupMagnitudeImportance p=2 over a head's coupled weights)."""
    modules = dict(model.named_modules())
    rows = []
    for unit in structure.attention:
        d, r = unit.head_dim, unit.num_heads // unit.num_kv_heads
        q = modules[unit.q].weight.detach().reshape(unit.num_heads, d, -1).square().sum(dim=(1, 2))
        o = modules[unit.o].weight.detach().reshape(-1, unit.num_heads, d).square().sum(dim=(0, 2))
        kv = sum(modules[n].weight.detach().reshape(unit.num_kv_heads, d, -1).square().sum(dim=(1, 2))
                 for n in (unit.k, unit.v))
        rows.append((q + o + kv.repeat_interleave(r) / r).double())
    return torch.stack(rows)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """``model`` with eager attention while Torch-Pruning traces it (its graph cannot group GQA
    heads through SDPA); the model's own attention implementation is restored on exit."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(impl)


def torch_pruning_heads_(model: torch.nn.Module, heads: int, example: torch.Tensor) -> None:
    """Torch-Pruning 1.6.1's Llama head pruning (``prune_llm.py``'s settings, heads only):
    ``BasePruner`` with GroupMagnitudeImportance(p=2), ``prune_num_heads``, local ranking. For GQA
    it removes the same number of query heads in every KV group and keeps every KV head."""
    import torch_pruning as tp

    config = model.config
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = config.num_attention_heads
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = config.num_key_value_heads
    # TP removes ceil(ratio * H / G) query heads per KV group; just under the exact ratio so that
    # floating-point rounding cannot push the ceiling up by one (1 - 6/9 = 0.33333333333333337).
    ratio = (config.num_attention_heads - heads) / config.num_attention_heads * (1 - 1e-9)
    with eager_attention(model):  # the graph is traced in the constructor
        pruner = tp.pruner.BasePruner(
            model, example_inputs={"input_ids": example, "use_cache": False},
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            output_transform=lambda out: out.logits, global_pruning=False, ignored_layers=[model.lm_head],
            pruning_ratio=0.0, pruning_ratio_dict={layer.self_attn.q_proj: ratio for layer in model.model.layers},
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=None)
    for group in pruner.step(interactive=True):
        group.prune()
    sync_config_(model, {"num_attention_heads": heads, "num_key_value_heads": config.num_key_value_heads})


def torch_pruning_mlp_(model: torch.nn.Module, keep: int, example: torch.Tensor) -> None:
    """Torch-Pruning 1.6.1: per layer, GroupMagnitudeImportance(p=2) over the gate/up/down group,
    prune the lowest (intermediate - keep) neurons through its dependency graph."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=lambda x: x.logits)
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    for layer in model.model.layers:
        gate = layer.mlp.gate_proj
        full = graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=list(range(gate.out_features)))
        scores = importance(full)
        drop = torch.sort(scores, stable=True).indices[: gate.out_features - keep].tolist()
        graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=drop).prune()
    model.config.intermediate_size = keep


# --------------------------------------------------------------------------- experiments
class Recorder:
    """Results JSON written after every row; with ``--resume`` finished rows and cached
    importance are reused, so an interrupted run (the machine is shared) continues where it stopped."""

    def __init__(self, path: Path, header: dict, resume: bool) -> None:
        self.path = path
        old = json.loads(path.read_text()) if resume and path.exists() else {}
        self.data = {**header, "rows": old.get("rows", []), "meta": old.get("meta", {}),
                     "total_seconds": old.get("total_seconds", 0.0)}

    def row(self, kind: str, shape: str, method: str, build, eval_windows, **extra) -> None:
        """Build, check the parameter count against the prediction, measure perplexity, record.

        A finished row from an older run without ``predicted_params`` is rebuilt and checked
        (no perplexity), so every recorded count is verified."""
        old = next((r for r in self.data["rows"] if (r["kind"], r["shape"], r["method"]) == (kind, shape, method)), None)
        if old is not None and "predicted_params" in old:
            return
        model = build()
        predicted = predicted_params(model)
        if num_params(model) != predicted:
            raise RuntimeError(f"{shape} / {method}: {num_params(model):,} parameters, predicted {predicted:,}")
        if old is not None:
            if old["params"] != predicted:
                raise RuntimeError(f"{shape} / {method}: recorded {old['params']:,} parameters, predicted {predicted:,}")
            old["predicted_params"] = predicted
            self.save()
            return
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_windows)
        row = {"kind": kind, "shape": shape, "method": method, "params": num_params(model),
               "predicted_params": predicted, "perplexity": ppl, "eval_seconds": round(time.perf_counter() - t0, 1),
               **extra}
        log.info("%s", row)
        self.data["rows"].append(row)
        self.save()

    def cached(self, key: str, compute):
        if key not in self.data["meta"]:
            t0 = time.perf_counter()
            value = compute()
            self.data["meta"][key] = {"value": value, "seconds": round(time.perf_counter() - t0, 1)}
            log.info("%s: %s", key, value)
            self.save()
        return self.data["meta"][key]["value"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def depth_experiments(rec: Recorder, model, structure, calib, eval_windows, args) -> None:
    bi_batches, loss_batches = batches_of(calib[: args.bi_windows]), batches_of(calib[: args.loss_windows])
    n = structure.num_layers
    bi = torch.tensor(rec.cached("bi", lambda: collect_block_importance(model, bi_batches).as_tensor(n).tolist()))
    # greedy, so the first k removals are the k-layer answer
    order = rec.cached("bi_iterative_order", lambda: bi_iterative(model, bi_batches, max(args.ks)))
    loss_drop = torch.tensor(rec.cached("layer_loss", lambda: layer_drop_losses(model, loss_batches).tolist()))
    for k in args.ks:
        methods = {
            "BI one-shot": select_one_shot(bi, k),
            "BI iterative": sorted(order[:k]),
            "LM-loss drop": select_one_shot(loss_drop, k),
            "last k": list(range(n - k, n)),
        }
        for seed in range(args.random_seeds):
            methods[f"random (seed {seed})"] = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
        for name, removed in methods.items():
            rec.row("depth", f"remove {k}", name, lambda r=removed: apply_checked(model, depth_plan(model, r)),
                    eval_windows, removed=removed)


# Width targets of SmolLM2-135M: label -> (MLP size, query heads, KV groups).
WIDTH_SHAPES = {"MLP 1536->768": (768, 9, 3), "heads 9->6 (KV 3->2)": (1536, 6, 2), "MLP 768 + heads 6/2": (768, 6, 2),
                # Torch-Pruning's GQA head pruning keeps every KV group: compared at its own shapes
                "heads 9->6 (KV 3 kept)": (1536, 6, 3), "MLP 768 + heads 6/3": (768, 6, 3)}


def width_experiments(rec: Recorder, model, graph, structure, calib, eval_windows, args) -> None:
    ours_cols = rec.cached("width_scores", lambda: _width_scores_dict(collect_width_scores(model, batches_of(calib), structure)))
    ours = WidthScores(*(torch.tensor(ours_cols[k], dtype=torch.float64) for k in ("hidden", "neurons", "heads")), 0)
    gen = torch.Generator().manual_seed(0)
    rand = WidthScores(ours.hidden, torch.rand(ours.neurons.shape, generator=gen, dtype=torch.float64),
                       torch.rand(ours.heads.shape, generator=gen, dtype=torch.float64), 0)
    mag = WidthScores(ours.hidden, ours.neurons, magnitude_head_scores(model, structure), 0)
    dense = Architecture.from_config(model.config)

    def pruned(scores: WidthScores, ffn: int, heads: int, kv: int):
        arch = Architecture(num_layers=dense.num_layers, hidden_size=dense.hidden_size, intermediate_size=ffn,
                            num_attention_heads=heads, num_key_value_heads=kv)
        return apply_checked(model, width_plan(graph, structure, scores, arch))

    def torch_pruning(ffn: int, heads: int, kv: int):
        """TP's MLP pruning; heads by TP where it can (KV groups kept), else weight-magnitude heads + our slicer."""
        if heads == dense.num_attention_heads:
            base = copy.deepcopy(model)
        elif kv == dense.num_key_value_heads:
            base = copy.deepcopy(model)
            torch_pruning_heads_(base, heads, calib[:1, :16])
        else:
            base = pruned(mag, dense.intermediate_size, heads, kv)
        if ffn != dense.intermediate_size:
            torch_pruning_mlp_(base, ffn, calib[:1, :16])
        return base

    for label, (ffn, heads, kv) in WIDTH_SHAPES.items():
        tp_heads = heads != dense.num_attention_heads and kv == dense.num_key_value_heads
        rec.row("width", label, "ours (Minitron activations)", lambda f=ffn, h=heads, g=kv: pruned(ours, f, h, g), eval_windows)
        if not tp_heads:
            rec.row("width", label, "random neurons/heads (seed 0)", lambda f=ffn, h=heads, g=kv: pruned(rand, f, h, g),
                    eval_windows)
        if heads != dense.num_attention_heads and not tp_heads:
            rec.row("width", label, "weight-magnitude heads + magnitude neurons (our slicer)",
                    lambda f=ffn, h=heads, g=kv: pruned(WidthScores(ours.hidden, _magnitude_neurons(model), mag.heads, 0), f, h, g),
                    eval_windows)
        if (ffn != dense.intermediate_size or tp_heads) and not args.skip_tp:
            parts = (["MLP"] if ffn != dense.intermediate_size else []) + (["heads"] if tp_heads else [])
            name = f"Torch-Pruning 1.6.1 {' + '.join(parts)} (group L2 magnitude)"
            name += " + weight-magnitude heads" if heads != dense.num_attention_heads and not tp_heads else ""
            rec.row("width", label, name, lambda f=ffn, h=heads, g=kv: torch_pruning(f, h, g), eval_windows)


def _width_scores_dict(scores: WidthScores) -> dict:
    return {"hidden": scores.hidden.tolist(), "neurons": scores.neurons.tolist(), "heads": scores.heads.tolist()}


def _magnitude_neurons(model) -> torch.Tensor:
    """[L, I]: ||gate row||^2 + ||up row||^2 + ||down column||^2 (what TP's group L2 importance ranks by)."""
    return torch.stack([
        (layer.mlp.gate_proj.weight.square().sum(1) + layer.mlp.up_proj.weight.square().sum(1)
         + layer.mlp.down_proj.weight.square().sum(0)).detach().double()
        for layer in model.model.layers
    ])


def render_markdown(data: dict) -> str:
    """Markdown tables of a results JSON: depth rows by k, width rows by shape, ratios to dense."""
    dense = next(r for r in data["rows"] if r["kind"] == "dense")
    lines = [f"Dense: {dense['params']:,} parameters, perplexity {dense['perplexity']:.2f}.", ""]
    for kind, title in (("depth", "Depth (layers removed)"), ("width", "Width")):
        rows = [r for r in data["rows"] if r["kind"] == kind]
        if not rows:
            continue
        lines += [f"**{title}**", "", "| shape | method | params | = predicted | perplexity | x dense ppl | layers removed |",
                  "|---|---|---:|:-:|---:|---:|---|"]
        for r in rows:
            removed = ", ".join(map(str, r.get("removed", []))) or "-"
            check = {True: "yes", False: "**no**"}.get(r.get("predicted_params") == r["params"]) if "predicted_params" in r else "-"
            lines.append(f"| {r['shape']} | {r['method']} | {r['params']:,} | {check} | {r['perplexity']:.2f} | "
                         f"{r['perplexity'] / dense['perplexity']:.2f} | {removed} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--bi-windows", type=int, default=16)
    parser.add_argument("--loss-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--skip-depth", action="store_true")
    parser.add_argument("--skip-width", action="store_true")
    parser.add_argument("--skip-tp", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse finished rows and cached importance in --out")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "minitron.json")
    parser.add_argument("--report", action="store_true", help="only print the Markdown tables of --out")
    args = parser.parse_args()
    if args.report:
        print(render_markdown(json.loads(args.out.read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    start = time.perf_counter()
    model, calib, eval_windows = load_model_and_tokens(args.calib_windows, args.eval_windows, args.length)
    graph = build_dependency_graph(model, kwargs={"input_ids": calib[:1, :16], "use_cache": False})
    structure = decoder_structure(model, graph)
    header = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    rec = Recorder(args.out, header, args.resume)
    rec.row("dense", "30 layers", "dense", lambda: model, eval_windows)
    if not args.skip_depth:
        depth_experiments(rec, model, structure, calib, eval_windows, args)
    if not args.skip_width:
        width_experiments(rec, model, graph, structure, calib, eval_windows, args)
    rec.data["total_seconds"] = round(rec.data["total_seconds"] + time.perf_counter() - start, 1)
    rec.save()
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
