"""Tasks of the Minitron search. Each loads its inputs from files, calls pruning_core, writes its
outputs atomically, records them in the run's manifest and returns small values (paths, names,
numbers), so candidate tasks can run in threads, processes or on Dask workers alike.

Every task is idempotent at the artifact level: if the manifest already holds its verified
outputs it returns them without recomputing, which is how a crashed or repeated job resumes.

Layout of a run directory::

    config.json, manifest.json, summary.json, timings.json
    inputs.json            the resolved model, dense architecture and the candidates
    windows.safetensors    calibration, evaluation and (with distillation) distillation token windows
    scores.parquet         every importance score, computed once (long table, see below)
    candidates/<id>/plan.json, result.json    one per candidate
    model/                 the chosen candidate, a Hugging Face directory
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.minitron import MinitronJob, candidate_id, short_architecture
from pruning_core.graph import StructuredPlan, apply_plan_
from pruning_core.io.atomic import atomic_path, atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.io.tensors import load_tensors, save_tensors
from pruning_core.lm import (
    calibration_windows,
    evaluation_windows,
    generate_text,
    load_causal_lm,
    load_text,
    model_fingerprint,
    perplexity,
    save_pretrained_atomic,
    smollm2_dir,
    tokenize_corpus,
)
from pruning_core.minitron import (
    Architecture,
    MinitronScores,
    ModelShape,
    bi_iterative,
    build_candidate,
    candidate_plan,
    compute_scores,
    disjoint_windows,
    distill_,
    evaluate_candidate,
    lm_loss,
    loss_iterative,
    trace_decoder,
)
from pruning_core.minitron.search import ITERATIVE_CRITERIA

log = logging.getLogger(__name__)

# Prefect must not hash or persist our arguments: resumption is done with the run's manifest.
TASK = {"cache_policy": NO_CACHE, "persist_result": False}
SCHEMA = pa.schema([("axis", pa.string()), ("layer", pa.int32()), ("index", pa.int32()), ("score", pa.float64())])
PROMPT = "It is a truth universally acknowledged"
# transformers' from_pretrained swaps torch.nn.init functions process-wide while it loads; two
# threads loading at once can leave them swapped. Loads in this process take turns.
_LOAD_LOCK = threading.Lock()
# torch.export keeps its dispatch-mode stack per process, not per thread: two candidate tasks
# tracing at once on the thread runner fail ("ProxyTorchDispatchMode slot already occupied").
_TRACE_LOCK = threading.Lock()


def _path(run_dir: str, name: str) -> Path:
    return Path(run_dir) / name


def _candidate_dir(run_dir: str, cid: str) -> Path:
    return Path(run_dir) / "candidates" / cid


def _done(run_dir: str, *names: str) -> bool:
    manifest = Manifest(run_dir)
    return all(manifest.is_complete(n) for n in names)


def load_model(model_dir: str, device: str) -> tuple[Any, Any]:
    with _LOAD_LOCK:
        return load_causal_lm(model_dir, device=device)


def _batches(run_dir: str, which: str, count: int | None, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``count`` windows of ``which`` (all if None) in batches, on ``device``."""
    windows = load_tensors(_path(run_dir, "windows.safetensors"), [which])[which]
    return [b.to(device) for b in windows[:count].split(batch_size)]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@task(name="prepare-inputs", **TASK)
def prepare_inputs(job: MinitronJob, run_dir: str) -> dict[str, Any]:
    """Load and check the model, enumerate the candidates (bad targets fail here, before any long
    work), cut the token windows, trace the dependency graph.

    With distillation on, its windows are drawn here too: none shares a token position with
    the candidate windows (the first ``candidate_windows`` calibration windows), so candidates
    are never scored on what they were just trained on."""
    record = _path(run_dir, "inputs.json")
    if _done(run_dir, "inputs", "windows"):
        return json.loads(record.read_text())
    model_dir = smollm2_dir() if job.model == "smollm2" else Path(job.model)
    model, tokenizer = load_model(str(model_dir), job.device)  # checks files, shapes and NaN/Inf
    dense, shape = Architecture.from_config(model.config), ModelShape.from_config(model.config)
    candidates, total = job.candidates(dense, shape)
    if total > len(candidates):
        log.warning("%d architectures meet the target; scoring the largest %d (target.max_candidates)",
                    total, len(candidates))
    cal, ev = job.calibration, job.evaluation
    tokens = tokenize_corpus(tokenizer, load_text(cal.text, field=cal.text_field))
    windows = {"calibration": calibration_windows(tokens, cal.num_windows, cal.window_length, cal.seed,
                                                  what=f"calibration text '{cal.text}'")}
    if job.distillation.steps:
        windows["distillation"] = disjoint_windows(tokens, job.distillation.windows, cal.window_length,
                                                   job.distillation.seed,
                                                   avoid=windows["calibration"][: cal.candidate_windows])
    if ev.enabled:
        ev_tokens = tokenize_corpus(tokenizer, load_text(ev.text, field=ev.text_field))
        windows["evaluation"] = evaluation_windows(ev_tokens, ev.num_windows, ev.window_length,
                                                   what=f"evaluation text '{ev.text}'")
    manifest = Manifest(run_dir)
    save_tensors(_path(run_dir, "windows.safetensors"), windows)
    manifest.record("windows", _path(run_dir, "windows.safetensors"), kind="tokens")
    trace_decoder(model, windows["calibration"][:1, :16].to(_device(model)))  # unsupported models fail here
    dense_params = sum(p.numel() for p in model.parameters())
    info = {"model_dir": str(Path(model_dir).resolve()), "fingerprint": model_fingerprint(model_dir),
            "dense_architecture": dense.to_dict(), "dense_parameters": dense_params,
            "budget": job.library_target(dense, dense_params).param_budget, "candidates_enumerated": total,
            "candidates": [{"id": candidate_id(a), "architecture": a.to_dict(),
                            "predicted_parameters": shape.num_parameters(a)}
                           for a in candidates]}
    atomic_write_text(record, json.dumps(info, indent=1))
    manifest.record("inputs", record, kind="json")
    return info


@task(name="compute-scores", **TASK)
def compute_importance(job: MinitronJob, run_dir: str, inputs: dict[str, Any]) -> str:
    """Every importance score, once, to ``scores.parquet`` (reused by every candidate and rerun).

    Also the dense model's loss on the candidate windows (the reference for candidates' losses)
    and, for ``bi_iterative`` / ``loss_iterative``, the greedy removal order, both in the table's
    metadata. ``loss`` adds the per-layer drop losses, ``loss_block`` the block drop losses for
    every number of layers a candidate removes.
    """
    out = _path(run_dir, "scores.parquet")
    if _done(run_dir, "scores"):
        return str(out)
    model, _ = load_model(inputs["model_dir"], job.device)
    graph, structure = load_graph(run_dir, model)
    cal, device = job.calibration, _device(model)
    criterion = job.depth_criterion
    batches = _batches(run_dir, "calibration", cal.score_windows, cal.batch_size, device)
    loss_batches = (_batches(run_dir, "calibration", cal.loss_windows, cal.batch_size, device)
                    if criterion in ("loss", "loss_block", "loss_iterative") else None)
    removals = sorted({structure.num_layers - c["architecture"]["num_layers"] for c in inputs["candidates"]} - {0})
    scores = compute_scores(model, batches, structure, width_config=job.width_config(),
                            loss_batches=loss_batches if criterion in ("loss", "loss_block") else None,
                            layer_loss=criterion == "loss", block_sizes=removals if criterion == "loss_block" else (),
                            progress=True)
    meta = {"job_hash": job.job_hash(), "model_fingerprint": inputs["fingerprint"],
            "seq_agg": job.importance.seq_agg, "batch_agg": job.importance.batch_agg,
            "num_tokens": str(scores.width.num_tokens), "depth_criterion": job.depth_criterion,
            "score_windows": str(sum(len(b) for b in batches)),
            "loss_windows": str(sum(len(b) for b in loss_batches or [])),
            "dense_candidate_loss": repr(lm_loss(model, _candidate_batches(job, run_dir, device)))}
    if criterion in ITERATIVE_CRITERIA:
        most = structure.num_layers - min(c["architecture"]["num_layers"] for c in inputs["candidates"])
        select, on = (bi_iterative, batches) if criterion == "bi_iterative" else (loss_iterative, loss_batches)
        meta[f"{criterion}_order"] = json.dumps(select(model, on, most, min_layers=job.target.min_layers))
    table = pa.table(scores.to_columns(), schema=SCHEMA.with_metadata(meta))
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    Manifest(run_dir).record("scores", out, kind="scores")
    return str(out)


def _candidate_batches(job: MinitronJob, run_dir: str, device: torch.device) -> list[torch.Tensor]:
    cal = job.calibration
    return _batches(run_dir, "calibration", cal.candidate_windows, cal.batch_size, device)


def _distill_batches(job: MinitronJob, run_dir: str, device: torch.device) -> list[torch.Tensor] | None:
    """The distillation windows (disjoint from the candidate windows), or None without distillation."""
    if not job.distillation.steps:
        return None
    return _batches(run_dir, "distillation", None, job.calibration.batch_size, device)


def load_graph(run_dir: str, model: Any) -> tuple[Any, Any]:
    """The dense model's ``(DependencyGraph, DecoderStructure)``, traced again on the run's first
    calibration tokens (deterministic, about a second; no pickled graph is ever loaded)."""
    ids = load_tensors(_path(run_dir, "windows.safetensors"), ["calibration"])["calibration"][:1, :16]
    with _TRACE_LOCK:
        return trace_decoder(model, ids.to(_device(model)))


def load_scores(path: str | Path) -> tuple[MinitronScores, dict[str, str]]:
    """The scores table as :class:`MinitronScores`, and its metadata."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return MinitronScores.from_columns(table.to_pydict(), num_tokens=int(meta.get("num_tokens", 0))), meta


def make_plan(job: MinitronJob, run_dir: str, model: Any, arch: Architecture) -> StructuredPlan:
    """The candidate's structural plan from the cached graph and scores."""
    graph, structure = load_graph(run_dir, model)
    scores, meta = load_scores(_path(run_dir, "scores.parquet"))
    criterion = job.depth_criterion
    order = json.loads(meta[f"{criterion}_order"]) if criterion in ITERATIVE_CRITERIA else None  # greedy prefix
    return candidate_plan(model, graph, structure, scores, arch, depth_criterion=criterion, removal_order=order)


def _removed_layers(plan: StructuredPlan) -> list[int]:
    return [i for r in plan.layer_removals for i in r.indices]


@task(name="score-candidate", task_run_name="candidate-{candidate[id]}", **TASK)
def score_candidate(job: MinitronJob, run_dir: str, inputs: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Build one candidate from the dense model + cached scores, measure its LM loss on the
    candidate windows (after the optional distillation on the distillation windows), save its
    plan; returns its result (small values)."""
    cid = candidate["id"]
    folder = _candidate_dir(run_dir, cid)
    if _done(run_dir, f"plan:{cid}", f"candidate:{cid}"):
        return json.loads((folder / "result.json").read_text())
    start = time.perf_counter()
    dense, _ = load_model(inputs["model_dir"], job.device)
    arch = Architecture(**candidate["architecture"])
    plan = make_plan(job, run_dir, dense, arch)
    model = build_candidate(dense, plan)
    device = _device(dense)
    loss, history = evaluate_candidate(model, _candidate_batches(job, run_dir, device), teacher=dense,
                                       distill_steps=job.distillation.steps, distill_lr=job.distillation.lr,
                                       distill_batches=_distill_batches(job, run_dir, device))
    result = {"id": cid, "architecture": short_architecture(Architecture.from_config(model.config)),
              "parameters": sum(p.numel() for p in model.parameters()), "loss": loss,
              "distill_losses": history, "removed_layers": _removed_layers(plan),
              "seconds": round(time.perf_counter() - start, 3)}
    manifest = Manifest(run_dir)
    atomic_write_text(folder / "plan.json", plan.to_json())
    manifest.record(f"plan:{cid}", folder / "plan.json", kind="plan")
    atomic_write_text(folder / "result.json", json.dumps(result, indent=1))
    manifest.record(f"candidate:{cid}", folder / "result.json", kind="json")
    log.info("candidate %s: %d parameters, loss %.4f", cid, result["parameters"], loss)
    return result


@task(name="rebuild-chosen", **TASK)
def rebuild_chosen(job: MinitronJob, run_dir: str, inputs: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the chosen candidate from a fresh dense model and its plan (repeating the short
    distillation if configured), save it as a Hugging Face directory; returns its parameter count
    and a greedy sample (proof that it generates with its KV cache)."""
    out, record = _path(run_dir, "model"), _path(run_dir, "chosen.json")
    if _done(run_dir, "model", "chosen"):
        return json.loads(record.read_text())
    model, tokenizer = load_model(inputs["model_dir"], job.device)
    plan = StructuredPlan.from_json((_candidate_dir(run_dir, chosen["id"]) / "plan.json").read_text())
    if job.distillation.steps:
        teacher, _ = load_model(inputs["model_dir"], job.device)
        apply_plan_(model, plan)
        distill_(model, teacher, _distill_batches(job, run_dir, _device(model)), steps=job.distillation.steps,
                 lr=job.distillation.lr)
        model.eval()
    else:
        apply_plan_(model, plan)
    extra = {"minitron": {"job_hash": job.job_hash(), "candidate": chosen["id"], "plan": plan.to_dict(),
                          "depth_criterion": job.depth_criterion, "distill_steps": job.distillation.steps}}
    save_pretrained_atomic(model, tokenizer, out, extra=extra)
    info = {"model_dir": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "sample": generate_text(model, tokenizer, PROMPT, max_new_tokens=16)}
    atomic_write_text(record, json.dumps(info, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("model", out, kind="model")
    manifest.record("chosen", record, kind="json")
    return info


@task(name="evaluate", task_run_name="evaluate-{key}", **TASK)
def evaluate(job: MinitronJob, run_dir: str, model_dir: str, key: str) -> float:
    """Perplexity of the model in ``model_dir`` on the evaluation windows (recorded as ``key``)."""
    out = _path(run_dir, f"{key}.json")
    if _done(run_dir, key):
        return float(json.loads(out.read_text())["perplexity"])
    model, _ = load_model(model_dir, job.device)
    windows = load_tensors(_path(run_dir, "windows.safetensors"), ["evaluation"])["evaluation"]
    ppl = perplexity(model, windows, batch_size=job.evaluation.batch_size)
    atomic_write_text(out, json.dumps({"perplexity": ppl, "model_dir": model_dir}))
    Manifest(run_dir).record(key, out, kind="metric")
    return ppl
