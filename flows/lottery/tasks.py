"""The tasks of the Lottery Ticket flow: train one round, record it in MLflow, publish the ticket.

Each task does one thing with the library or the tracker and exchanges only small JSON-able
values and paths with the flow. A round's state lives on disk under the job's output directory
(names from :mod:`pruning_core.io.paths`): the library's checkpoint under
``tickets/<config hash>/round_NNN/`` (its ``ticket.json`` is the commit mark) and the round record
with its learning curves in ``rounds/round_NNN.json``, written just before the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import task

from flows.execution import IO_TASK, torch_threads
from flows.lottery.config import LotteryJob
from flows.lottery.mlflow_model import LOADER_MODULE as TICKET_LOADER
from flows.lottery.models import build_model
from flows.report import lottery_figure
from flows.tracking import JOB_TAG, ROLE_TAG, Tracker
from pruning_core.errors import ConfigError
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_path, atomic_write_text
from pruning_core.lm import resolve_device
from pruning_core.lottery import (
    ClassifierTrainFn,
    LotteryTicketPruner,
    RoundRecord,
    TicketStore,
    TrainSpec,
    WinningTicket,
)
from pruning_core.lottery.paths import round_dir
from pruning_core.vision import ImageData, load_fashion_mnist

ROUND_TAG = "pruning.round"
# on_eval(spec, step, metrics): called at every test-set evaluation of every training run
EvalObserver = Callable[[TrainSpec, int, dict[str, float]], None]


def tickets_dir(job: LotteryJob, run_dir: str | Path) -> Path:
    """The root of the search's ticket store: ``tickets/<search config hash>``."""
    return paths.tickets(run_dir, job.lottery_config().hashname())


def ticket_dir(job: LotteryJob, run_dir: str | Path, round_index: int) -> Path:
    """The checkpoint directory of round ``round_index``."""
    return round_dir(tickets_dir(job, run_dir), round_index)


def tracker_for(job: LotteryJob) -> Tracker:
    return Tracker(job.tracking.tracking_uri, job.tracking.experiment)


def round_identity(job: LotteryJob, round_index: int) -> dict[str, str]:
    return {JOB_TAG: job.job_hash(), ROLE_TAG: "round", ROUND_TAG: str(round_index)}


# -- the workspace of a round: data and learning curves ---------------------------------------------
def _subset(data: ImageData, n: int | None, seed: int, field: str) -> ImageData:
    if n is None:
        return data
    try:
        return data.subset(n, seed=seed)
    except ConfigError as e:
        raise ConfigError(field, e.message) from None


def load_data(job: LotteryJob, device: torch.device) -> tuple[ImageData, ImageData]:
    """Fashion-MNIST train and test sets (optionally subsampled) on ``device``."""
    d = job.data
    train = _subset(load_fashion_mnist("train", root=d.root), d.train_subset, d.subset_seed, "data.train_subset")
    test = _subset(load_fashion_mnist("test", root=d.root), d.test_subset, d.subset_seed, "data.test_subset")
    return train.to(device), test.to(device)


class CurveRecorder:
    """``on_eval`` of the train function: keeps a round's learning curves, forwards to an observer.

    Points are ``(metric key, value, iteration)``; the IMP run's keys are ``accuracy`` and ``loss``,
    a control's are prefixed with its name (``random_mask_accuracy``).
    """

    def __init__(self, observer: EvalObserver | None = None) -> None:
        self.points: list[tuple[str, float, int]] = []
        self.observer = observer

    def __call__(self, spec: TrainSpec, step: int, metrics: dict[str, float]) -> None:
        prefix = "" if spec.run == "imp" else f"{spec.run}_"
        self.points.extend((prefix + k, float(v), int(step)) for k, v in metrics.items())
        if self.observer is not None:
            self.observer(spec, step, metrics)


def _progress(pruner: LotteryTicketPruner, ticket: WinningTicket) -> dict[str, Any]:
    return {"round": ticket.round, "done": pruner.is_done(ticket), "records": [r.to_dict() for r in ticket.records]}


# -- tasks ------------------------------------------------------------------------------------------
@task(name="resume-point", **IO_TASK)
def resume_point(job: LotteryJob, run_dir: str) -> dict[str, Any]:
    """The last completed round of the search in ``run_dir`` (-1 if none), its records, and done."""
    cfg = job.lottery_config()
    ticket = TicketStore(tickets_dir(job, run_dir)).latest(config_hash=cfg.hashname())
    if ticket is None:
        return {"round": -1, "done": False, "records": []}
    return _progress(LotteryTicketPruner(cfg), ticket)


@task(name="train-round", task_run_name="train-round-{round_index}", **IO_TASK)
def train_round(job: LotteryJob, run_dir: str, round_index: int, on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """Round 0: the dense run; round r: prune, rewind, retrain (+ controls). Commits the checkpoint."""
    cfg = job.lottery_config()
    pruner, store = LotteryTicketPruner(cfg), TicketStore(tickets_dir(job, run_dir))
    device = resolve_device(job.device)
    train, test = load_data(job, device)
    model = build_model(job.model, cfg.seed).to(device)
    curves = CurveRecorder(on_eval)
    train_fn = ClassifierTrainFn(train.images, train.labels, job.training_config(), test=(test.images, test.labels),
                                 eval_every=job.training.eval_every, on_eval=curves, progress=True)
    with torch_threads(job.training.threads):
        if round_index == 0:
            ticket = pruner.start(model, train_fn)
        else:
            ticket = pruner.run_round(model, train_fn, store.load(round_index - 1), controls=job.controls)
    # The round file first, then the checkpoint whose ticket.json commits the round.
    record = {"record": ticket.records[-1].to_dict(), "curves": curves.points, "end_step": cfg.training_steps}
    atomic_write_text(paths.round_record(run_dir, round_index), json.dumps(record))
    store.save(ticket)
    return _progress(pruner, ticket)


@task(name="open-round-run", task_run_name="open-round-run-{round_index}", **IO_TASK)
def open_round_run(job: LotteryJob, round_index: int, parent_run_id: str) -> str:
    """The round's MLflow child run: found again by its tags after a crash, created otherwise."""
    run_id, _ = tracker_for(job).start_run(round_identity(job, round_index), run_name=f"round-{round_index}",
                                           parent_run_id=parent_run_id)
    return run_id


@task(name="close-run", **IO_TASK)
def close_run(job: LotteryJob, run_id: str, status: str) -> None:
    tracker_for(job).end_run(run_id, status)


def round_points(data: dict[str, Any]) -> list[tuple[str, float, int]]:
    """A round's child-run metrics: learning curves (step = iteration) and final values (step = end)."""
    rec, end = RoundRecord.from_dict(data["record"]), int(data["end_step"])
    points = [(str(k), float(v), int(s)) for k, v, s in data["curves"]]
    for prefix, metrics in {"": rec.metrics, **{f"{k}_": m for k, m in rec.controls.items()}}.items():
        points += [(prefix + k, v, end) for k, v in metrics.items() if k != "steps"]
    return [*points, ("density", rec.density, 0)]


def summary_row(record: dict[str, Any]) -> dict[str, Any]:
    """One round of summary.json: density, accuracy and the controls' accuracies (None when not run)."""
    rec = RoundRecord.from_dict(record)
    control = {k: rec.controls.get(k, {}).get("accuracy") for k in ("random_reinit", "random_mask")}
    return {
        "round": rec.round,
        "density": rec.density,
        "accuracy": rec.metrics.get("accuracy"),
        "loss": rec.metrics.get("loss"),
        "random_reinit_accuracy": control["random_reinit"],
        "random_mask_accuracy": control["random_mask"],
        "seconds": rec.metrics.get("seconds", 0.0) + sum(m.get("seconds", 0.0) for m in rec.controls.values()),
        "layer_density": dict(rec.layer_density),
    }


@task(name="log-round", task_run_name="log-round-{round_index}", **IO_TASK)
def log_round(job: LotteryJob, run_dir: str, round_index: int, parent_run_id: str) -> str:
    """Record a completed round in MLflow once: its child run and its point on the parent's series."""
    tracker = tracker_for(job)
    data = json.loads(paths.round_record(run_dir, round_index).read_text())
    row = summary_row(data["record"])

    def fill(child: str) -> None:
        tracker.log_params(child, {"round": round_index, "controls": ",".join(job.controls) or "none"})
        tracker.log_metrics_once(child, round_points(data))
        tracker.log_table(child, [{"layer": k, "density": v} for k, v in row["layer_density"].items()],
                          "layer_density.json")
        series = ("density", "accuracy", "loss", "random_reinit_accuracy", "random_mask_accuracy")
        tracker.log_metrics_once(parent_run_id, [(k, row[k], round_index) for k in series if row[k] is not None])
        tracker.set_tags(child, {"pruning.density": f"{row['density']:.6f}"})

    # A round redone because its checkpoint broke was reopened by open_round_run: same results,
    # already logged; log_child_once only closes it again.
    return tracker.log_child_once(parent_run_id, round_identity(job, round_index), f"round-{round_index}", fill)


@task(name="log-search-results", **IO_TASK)
def log_search_results(job: LotteryJob, run_dir: str, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """The accuracy-vs-density figure, the per-round table and the headline metrics on the parent run."""
    import matplotlib.pyplot as plt

    tracker, figure = tracker_for(job), paths.accuracy_figure(run_dir)
    fig = lottery_figure(rows, f"{job.model}, {job.search.rewind_strategy} rewinding ({job.name})")
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tracker.log_artifact(parent_run_id, figure)
    tracker.log_table(parent_run_id, [{k: v for k, v in r.items() if k != "layer_density"} for r in rows], "rounds.json")
    final = rows[-1]
    tracker.log_metrics_once(parent_run_id, [("dense_accuracy", rows[0]["accuracy"], 0),
                                             ("ticket_accuracy", final["accuracy"], final["round"]),
                                             ("ticket_density", final["density"], final["round"])])


@task(name="publish-ticket", **IO_TASK)
def publish_ticket(job: LotteryJob, run_dir: str, parent_run_id: str, final: dict[str, Any]) -> dict | None:
    """Log the final ticket (safetensors + JSON + model card) on the parent run and register it."""
    tracker = tracker_for(job)
    tracker.log_artifacts(parent_run_id, ticket_dir(job, run_dir, final["round"]), "ticket")
    card = {"model": job.model, "job_hash": job.job_hash(), "round": final["round"], "density": final["density"],
            "accuracy": final["accuracy"], "load": "flows.lottery.load_registered_ticket"}
    tracker.log_dict(parent_run_id, card, "ticket/model.json")
    if not job.tracking.log_model:
        return None
    tracker.log_pyfunc_flavor(parent_run_id, "ticket", TICKET_LOADER, metadata={JOB_TAG: job.job_hash(), "job": "lottery"})
    name, alias = job.registered_model_name, job.registry.alias
    version = tracker.register_model_version(
        name, parent_run_id, "ticket", alias=alias, description=f"Lottery ticket of job {job.job_hash()}",
        tags={JOB_TAG: job.job_hash(), "round": final["round"], "density": f"{final['density']:.6f}",
              "accuracy": final["accuracy"]})
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}


__all__ = ["EvalObserver", "close_run", "log_round", "log_search_results", "open_round_run", "publish_ticket",
           "resume_point", "summary_row", "ticket_dir", "train_round"]
