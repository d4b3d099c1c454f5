"""The tasks of the Lottery Ticket flow: train one round, record it in MLflow, publish the ticket.

Each task does one thing with the library or the tracker and exchanges only small JSON-able
values and paths with the flow. A round's state lives on disk under the job's output directory:

    <output_dir>/job.json                        the job (hash) owning the directory
    <output_dir>/tickets/<config hash>/round_NNN/ the library's checkpoint (ticket.json = commit mark)
    <output_dir>/rounds/round_NNN.json           round record and learning curves, written just before it
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.lottery import EvalObserver, LotteryJob, build_model
from flows.tracking import JOB_TAG, KIND_TAG, ROLE_TAG, Tracker
from pruning_core.errors import ConfigError
from pruning_core.io.atomic import atomic_write_text
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
LOGGED_TAG = "pruning.round_logged"  # set on a round's child run once everything of the round is logged


@dataclass(frozen=True)
class SearchPaths:
    """Every on-disk name of a lottery job's output directory."""

    root: Path
    config_hash: str

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def tickets(self) -> Path:
        return self.root / "tickets" / self.config_hash

    def ticket_dir(self, round_index: int) -> Path:
        return round_dir(self.tickets, round_index)

    def round_file(self, round_index: int) -> Path:
        return self.root / "rounds" / f"round_{round_index:03d}.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def figure(self) -> Path:
        return self.root / "accuracy_vs_density.png"


def search_paths(job: LotteryJob, output_dir: str | Path) -> SearchPaths:
    return SearchPaths(Path(output_dir), job.lottery_config().hashname())


def tracker_for(job: LotteryJob) -> Tracker:
    return Tracker(job.tracking.tracking_uri, job.tracking.experiment)


def search_identity(job: LotteryJob) -> dict[str, str]:
    return {JOB_TAG: job.job_hash(), KIND_TAG: "lottery", ROLE_TAG: "search"}


def round_identity(job: LotteryJob, round_index: int) -> dict[str, str]:
    return {JOB_TAG: job.job_hash(), ROLE_TAG: "round", ROUND_TAG: str(round_index)}


# -- the workspace of a round: device, data, model, train function --------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (None: leave torch's setting), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# -- tasks ------------------------------------------------------------------------------------------
@task(name="resume-point", cache_policy=NO_CACHE, persist_result=False)
def resume_point(job: LotteryJob, output_dir: str) -> dict[str, Any]:
    """The last completed round of the search in ``output_dir`` (-1 if none), its records, and done."""
    cfg = job.lottery_config()
    paths = search_paths(job, output_dir)
    _claim(job, paths)
    ticket = TicketStore(paths.tickets).latest(config_hash=cfg.hashname())
    if ticket is None:
        return {"round": -1, "done": False, "records": []}
    return _progress(LotteryTicketPruner(cfg), ticket)


def _claim(job: LotteryJob, paths: SearchPaths) -> None:
    """Refuse an output directory that holds another job; record this job in it otherwise."""
    if paths.job_file.is_file():
        other = json.loads(paths.job_file.read_text()).get("job_hash")
        if other != job.job_hash():
            raise ConfigError(
                "output_dir", f"{paths.root} holds job {other}, not {job.job_hash()}; use another directory"
            )
        return
    atomic_write_text(paths.job_file, json.dumps({"job_hash": job.job_hash(), "job": job.model_dump(mode="json")},
                                                 indent=1))


def _progress(pruner: LotteryTicketPruner, ticket: WinningTicket) -> dict[str, Any]:
    return {"round": ticket.round, "done": pruner.is_done(ticket), "records": [r.to_dict() for r in ticket.records]}


@task(name="train-round", task_run_name="train-round-{round_index}", cache_policy=NO_CACHE, persist_result=False)
def train_round(job: LotteryJob, output_dir: str, round_index: int,
                on_eval: EvalObserver | None = None) -> dict[str, Any]:
    """Round 0: the dense run; round r: prune, rewind, retrain (+ controls). Commits the checkpoint."""
    cfg = job.lottery_config()
    paths = search_paths(job, output_dir)
    pruner, store = LotteryTicketPruner(cfg), TicketStore(paths.tickets)
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
    atomic_write_text(paths.round_file(round_index), json.dumps(record))
    store.save(ticket)
    return _progress(pruner, ticket)


@task(name="open-round-run", task_run_name="open-round-run-{round_index}", cache_policy=NO_CACHE)
def open_round_run(job: LotteryJob, round_index: int, parent_run_id: str) -> str:
    """The round's MLflow child run: found again by its tags after a crash, created otherwise."""
    run_id, _ = tracker_for(job).start_run(round_identity(job, round_index), run_name=f"round-{round_index}",
                                           parent_run_id=parent_run_id)
    return run_id


@task(name="close-run", cache_policy=NO_CACHE)
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


@task(name="log-round", task_run_name="log-round-{round_index}", cache_policy=NO_CACHE)
def log_round(job: LotteryJob, output_dir: str, round_index: int, parent_run_id: str) -> str:
    """Record a completed round in MLflow once: its child run and its point on the parent's series."""
    tracker, identity = tracker_for(job), round_identity(job, round_index)
    done = tracker.find_run({**identity, "mlflow.parentRunId": parent_run_id, LOGGED_TAG: "true"})
    if done:
        # Reopened by open_round_run because the round's checkpoint broke and the round was redone
        # (TicketStore.latest fell back): same results, already logged; close it again.
        if tracker.client.get_run(done).info.status == "RUNNING":
            tracker.end_run(done)
        return done
    child, _ = tracker.start_run(identity, run_name=f"round-{round_index}", parent_run_id=parent_run_id)
    data = json.loads(search_paths(job, output_dir).round_file(round_index).read_text())
    row = summary_row(data["record"])
    tracker.log_params(child, {"round": round_index, "controls": ",".join(job.controls) or "none"})
    tracker.log_metrics_once(child, round_points(data))
    tracker.log_table(child, [{"layer": k, "density": v} for k, v in row["layer_density"].items()],
                      "layer_density.json")
    series = ("density", "accuracy", "loss", "random_reinit_accuracy", "random_mask_accuracy")
    tracker.log_metrics_once(parent_run_id, [(k, row[k], round_index) for k in series if row[k] is not None])
    tracker.set_tags(child, {LOGGED_TAG: "true", "pruning.density": f"{row['density']:.6f}"})
    tracker.end_run(child)
    return child


@task(name="publish-ticket", cache_policy=NO_CACHE)
def publish_ticket(job: LotteryJob, output_dir: str, parent_run_id: str, final: dict[str, Any]) -> dict | None:
    """Log the final ticket (safetensors + JSON + model card) on the parent run and register it."""
    tracker, paths = tracker_for(job), search_paths(job, output_dir)
    tracker.log_artifacts(parent_run_id, paths.ticket_dir(final["round"]), "ticket")
    card = {"model": job.model, "job_hash": job.job_hash(), "round": final["round"], "density": final["density"],
            "accuracy": final["accuracy"], "load": "flows.lottery.load_registered_ticket"}
    tracker.log_dict(parent_run_id, card, "ticket/model.json")
    if not job.tracking.log_model:
        return None
    name, alias = job.registered_model_name, job.registry.alias
    version = tracker.register_model_version(
        name, parent_run_id, "ticket", alias=alias, description=f"Lottery ticket of job {job.job_hash()}",
        tags={JOB_TAG: job.job_hash(), "round": final["round"], "density": f"{final['density']:.6f}",
              "accuracy": final["accuracy"]})
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}
