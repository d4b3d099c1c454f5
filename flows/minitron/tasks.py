"""Tasks of the Minitron search. Each loads its inputs from files, calls pruning_core, writes its
outputs atomically, records them in the run's manifest and returns small values (paths, names,
numbers), so candidate tasks can run in threads, processes or on Dask workers alike.

Every task is idempotent at the artifact level: if the manifest already holds its verified
outputs it returns them without recomputing, which is how a crashed or repeated job resumes.
File names come from :mod:`pruning_core.io.paths`; ``scores.parquet`` is a long table
(axis, layer, index, score) whose metadata holds the dense model's candidate loss and, for the
iterative depth criteria, the greedy removal order.
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
from prefect.artifacts import create_table_artifact

from flows import llm
from flows.execution import IO_TASK
from flows.minitron.config import MinitronJob, candidate_id, short_architecture
from flows.report import candidate_figure
from flows.tracking import JOB_TAG, ROLE_TAG, Tracker
from pruning_core.graph import StructuredPlan, apply_plan_
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_path, atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.lm import generate_text, model_fingerprint, save_pretrained_atomic
from pruning_core.lm.card import architecture_fields, write_model_card
from pruning_core.minitron import (
    Architecture,
    MinitronScores,
    ModelShape,
    bi_iterative,
    build_candidate,
    candidate_plan,
    compute_scores,
    distill_,
    evaluate_candidate,
    lm_loss,
    loss_iterative,
    trace_decoder,
)
from pruning_core.minitron.search import ITERATIVE_CRITERIA

log = logging.getLogger(__name__)

CANDIDATE_TAG = "pruning.candidate"
SCHEMA = pa.schema([("axis", pa.string()), ("layer", pa.int32()), ("index", pa.int32()), ("score", pa.float64())])
PROMPT = "It is a truth universally acknowledged"
# torch.export keeps its dispatch-mode stack per process, not per thread: two candidate tasks
# tracing at once on the thread runner fail ("ProxyTorchDispatchMode slot already occupied").
_TRACE_LOCK = threading.Lock()


def _done(run_dir: str, *names: str) -> bool:
    manifest = Manifest(run_dir)
    return all(manifest.is_complete(n) for n in names)


def _batches(run_dir: str, which: str, count: int | None, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``count`` windows of ``which`` (all if None) in batches, on ``device``."""
    return llm.window_batches(run_dir, which, batch_size, count=count, device=device)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _candidates(job: MinitronJob, model: Any) -> tuple[list[Architecture], int, ModelShape]:
    """The candidates to score (bad targets raise here, naming the field), how many exist, the model's shape."""
    dense, shape = Architecture.from_config(model.config), ModelShape.from_config(model.config)
    candidates, total = job.candidates(dense, shape)
    if total > len(candidates):
        log.warning("%d architectures meet the target; scoring the largest %d (target.max_candidates)",
                    total, len(candidates))
    return candidates, total, shape


def _distillation(job: MinitronJob) -> llm.DisjointWindows | None:
    """Distillation windows: none shares a token position with the candidate windows (the first
    ``candidate_windows`` calibration windows), so candidates are never scored on what they were
    just trained on."""
    d = job.distillation
    return llm.DisjointWindows("distillation", d.windows, d.seed, job.calibration.candidate_windows) if d.steps else None


@task(name="prepare-inputs", **IO_TASK)
def prepare_inputs(job: MinitronJob, run_dir: str) -> dict[str, Any]:
    """Load and check the model, enumerate the candidates (bad targets fail here, before any long
    work or file), cut the token windows (with distillation: its own, disjoint from the candidate
    windows), trace the dependency graph (unsupported models fail here)."""
    record = paths.inputs(run_dir)
    if _done(run_dir, "inputs", "windows"):
        return json.loads(record.read_text())
    model_dir = llm.input_model(job, run_dir)
    model, tokenizer = llm.load_model(model_dir, job.device)  # checks files, shapes and NaN/Inf
    candidates, total, shape = _candidates(job, model)
    llm.prepare_windows(run_dir, tokenizer, job.calibration, job.evaluation, extra=_distillation(job))
    trace_decoder(model, llm.load_windows(run_dir, "calibration")[:1, :16].to(_device(model)))
    dense, dense_params = Architecture.from_config(model.config), sum(p.numel() for p in model.parameters())
    info = {"model_dir": model_dir, "fingerprint": model_fingerprint(model_dir),
            "dense_architecture": dense.to_dict(), "dense_parameters": dense_params,
            "budget": job.library_target(dense, dense_params).param_budget, "candidates_enumerated": total,
            "candidates": [{"id": candidate_id(a), "architecture": a.to_dict(),
                            "predicted_parameters": shape.num_parameters(a)}
                           for a in candidates]}
    atomic_write_text(record, json.dumps(info, indent=1))
    Manifest(run_dir).record("inputs", record, kind="json")
    return info


@task(name="compute-scores", **IO_TASK)
def compute_importance(job: MinitronJob, run_dir: str, inputs: dict[str, Any]) -> str:
    """Every importance score, once, to ``scores.parquet`` (reused by every candidate and rerun).

    Also the dense model's loss on the candidate windows (the reference for candidates' losses)
    and, for ``bi_iterative`` / ``loss_iterative``, the greedy removal order, both in the table's
    metadata. ``loss`` adds the per-layer drop losses, ``loss_block`` the block drop losses for
    every number of layers a candidate removes.
    """
    out = paths.scores_table(run_dir)
    if _done(run_dir, "scores"):
        return str(out)
    model, _ = llm.load_model(inputs["model_dir"], job.device)
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
    ids = llm.load_windows(run_dir, "calibration")[:1, :16]
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
    scores, meta = load_scores(paths.scores_table(run_dir))
    criterion = job.depth_criterion
    order = json.loads(meta[f"{criterion}_order"]) if criterion in ITERATIVE_CRITERIA else None  # greedy prefix
    return candidate_plan(model, graph, structure, scores, arch, depth_criterion=criterion, removal_order=order)


def _removed_layers(plan: StructuredPlan) -> list[int]:
    return [i for r in plan.layer_removals for i in r.indices]


@task(name="score-candidate", task_run_name="candidate-{candidate[id]}", **IO_TASK)
def score_candidate(job: MinitronJob, run_dir: str, inputs: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Build one candidate from the dense model + cached scores, measure its LM loss on the
    candidate windows (after the optional distillation on the distillation windows), save its
    plan; returns its result (small values)."""
    cid = candidate["id"]
    plan_file, result_file = paths.candidate_plan(run_dir, cid), paths.candidate_result(run_dir, cid)
    if _done(run_dir, f"plan:{cid}", f"candidate:{cid}"):
        return json.loads(result_file.read_text())
    start = time.perf_counter()
    dense, _ = llm.load_model(inputs["model_dir"], job.device)
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
    atomic_write_text(plan_file, plan.to_json())
    manifest.record(f"plan:{cid}", plan_file, kind="plan")
    atomic_write_text(result_file, json.dumps(result, indent=1))
    manifest.record(f"candidate:{cid}", result_file, kind="json")
    log.info("candidate %s: %d parameters, loss %.4f", cid, result["parameters"], loss)
    return result


@task(name="rebuild-chosen", **IO_TASK)
def rebuild_chosen(job: MinitronJob, run_dir: str, inputs: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the chosen candidate from a fresh dense model and its plan (repeating the short
    distillation if configured), save it as a Hugging Face directory; returns its parameter count
    and a greedy sample (proof that it generates with its KV cache)."""
    out, record = paths.model(run_dir), paths.chosen(run_dir)
    if _done(run_dir, "model", "chosen"):
        return json.loads(record.read_text())
    model, tokenizer = llm.load_model(inputs["model_dir"], job.device)
    plan = StructuredPlan.from_json(paths.candidate_plan(run_dir, chosen["id"]).read_text())
    before = architecture_fields(model.config)
    if job.distillation.steps:
        teacher, _ = llm.load_model(inputs["model_dir"], job.device)
        apply_plan_(model, plan)
        distill_(model, teacher, _distill_batches(job, run_dir, _device(model)), steps=job.distillation.steps,
                 lr=job.distillation.lr)
        model.eval()
    else:
        apply_plan_(model, plan)
    extra = {"minitron": {"job_hash": job.job_hash(), "candidate": chosen["id"], "plan": plan.to_dict(),
                          "depth_criterion": job.depth_criterion, "distill_steps": job.distillation.steps}}
    save_pretrained_atomic(model, tokenizer, out, extra=extra)
    _write_card(job, out, before, architecture_fields(model.config))
    info = {"model_dir": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "sample": generate_text(model, tokenizer, PROMPT, max_new_tokens=16)}
    atomic_write_text(record, json.dumps(info, indent=1))
    manifest = Manifest(run_dir)
    manifest.record("model", out, kind="model")
    manifest.record("chosen", record, kind="json")
    return info


def _write_card(job: MinitronJob, out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    """The chosen model's README.md (architecture before/after, data, config); in its manifest."""
    windows = ("text", "num_windows", "window_length")
    config = job.model_dump(mode="json", exclude_defaults=True, exclude={"tracking", "runner", "name"})
    card = write_model_card(out, {
        "kind": "minitron", "base_model": job.model, "architecture": {"before": before, "after": after},
        "calibration": {k: getattr(job.calibration, k) for k in windows},
        "evaluation": {k: getattr(job.evaluation, k) for k in windows}, "command": "prune run job.yaml",
        "config": json.dumps(config, indent=1)})
    Manifest(out).record(card.name, card, kind="model-file")


def candidate_identity(job: MinitronJob, cid: str) -> dict[str, str]:
    return {JOB_TAG: job.job_hash(), ROLE_TAG: "candidate", CANDIDATE_TAG: cid}


@task(name="log-candidate", task_run_name="log-candidate-{result[id]}", **IO_TASK)
def log_candidate(job: MinitronJob, parent_run_id: str, result: dict[str, Any]) -> str:
    """A candidate's child run (architecture as params; parameters, loss as metrics), logged once."""
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)

    def fill(child: str) -> None:
        tracker.log_params(child, {**result["architecture"], "removed_layers": result["removed_layers"]})
        points = [("parameters", result["parameters"], 0), ("loss", result["loss"], 0),
                  ("seconds", result["seconds"], 0)]
        tracker.log_metrics_once(child, points + [("distill_kl", v, i) for i, v in enumerate(result["distill_losses"])])

    return tracker.log_child_once(parent_run_id, candidate_identity(job, result["id"]), result["id"], fill)


@task(name="log-results", **IO_TASK)
def log_results(job: MinitronJob, run_dir: str, run_id: str, summary: dict[str, Any]) -> None:
    """Headline metrics, the ranking table and figure, the scores and the chosen model on the job's
    MLflow run, and each candidate's rank on its child run."""
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    metrics = {"parameters": summary["parameters"], "dense_parameters": summary["dense_parameters"],
               "best_loss": summary["candidates"][0]["loss"], "dense_loss": summary["dense_loss"],
               "candidates": len(summary["candidates"]), "perplexity_before": summary["perplexity_before"],
               "perplexity_after": summary["perplexity_after"]}
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None})
    tracker.set_tags(run_id, {"chosen": summary["chosen"]})
    rows = [{"rank": c["rank"], "id": c["id"], **c["architecture"], "parameters": c["parameters"], "loss": c["loss"]}
            for c in summary["candidates"]]
    tracker.log_table(run_id, rows, "tables/candidates.json")
    create_table_artifact(rows, key=f"minitron-{job.job_hash()}-candidates", description="candidates by loss")
    for child in tracker.child_runs(run_id):
        cid = child.data.tags.get(CANDIDATE_TAG)
        tracker.set_tags(child.info.run_id, {"rank": next(r["rank"] for r in rows if r["id"] == cid)})
    if not tracker.has_artifact(run_id, "figures/candidates.png"):
        fig = candidate_figure(rows, summary["chosen"], summary["dense_loss"],
                               f"{job.name}: {len(rows)} candidates, {job.depth_criterion} depth criterion")
        tracker.log_figure(run_id, fig, "figures/candidates.png")
    tracker.log_artifact(run_id, paths.scores_table(run_dir))
    if job.tracking.log_model and not tracker.has_artifact(run_id, "model/config.json"):
        tracker.log_artifacts(run_id, paths.model(run_dir), "model")
