"""The Lottery Ticket flow end to end: Prefect test server, SQLite MLflow, LeNet on a Fashion-MNIST subset.

One uninterrupted search (through ``prune run``) is shared by the module; a second search with the
same config is crashed in round 2 and resumed, and must end with identical results.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from flows.cli import main as prune_main
from flows.jobs import parse_config
from flows.lottery import load_registered_ticket
from flows.lottery.flow import lottery_flow
from flows.tracking import JOB_TAG, LOGGED_TAG, ROLE_TAG
from pruning_core.lottery import evaluate, load_ticket
from pruning_core.vision import fashion_mnist_available, load_fashion_mnist

pytestmark = pytest.mark.flows
# Every search here reads Fashion-MNIST from the default path; config errors found before the flow starts do not.
needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist is not installed")
REPO = Path(__file__).resolve().parents[2]
ROUNDS, STEPS, EVAL = 3, 60, 20  # retraining from the rewind point 10 evaluates at iterations 20, 40, 60
JOB = {
    "job": "lottery",
    "name": "lt-test",
    "model": "lenet300_100",
    "device": "cpu",
    "search": {"target_sparsity": None, "pruning_rounds": ROUNDS, "prune_rate_per_round": 0.5,
               "global_pruning": False, "layer_rates": {"output.weight": 0.25}, "rewind_strategy": "early:10",
               "training_steps": STEPS, "seed": 3},
    "training": {"batch_size": 60, "eval_every": EVAL, "threads": 1},
    "data": {"train_subset": 1200, "test_subset": 500},
    "tracking": {"experiment": "lottery-tests"},
}
LAYERS = {"hidden.0.weight": (784 * 300, 0.5), "hidden.1.weight": (300 * 100, 0.5), "output.weight": (100 * 10, 0.25)}


class SimulatedCrash(RuntimeError):
    pass


class Observer:
    """Records every evaluation (round, run, iteration); raises once at ``crash_at`` if given."""

    def __init__(self, crash_at: tuple[int, str, int] | None = None) -> None:
        self.seen: list[tuple[int, str, int]] = []
        self.crash_at = crash_at

    def __call__(self, spec, step, metrics) -> None:
        assert 0.0 <= metrics["accuracy"] <= 1.0
        self.seen.append((spec.round_index, spec.run, step))
        if (spec.round_index, spec.run, step) == self.crash_at:
            raise SimulatedCrash(f"killed in round {spec.round_index} ({spec.run}, iteration {step})")


def expected_densities() -> list[tuple[dict[str, float], float]]:
    """Per-layer and overall density of rounds 0..R: a layer of n weights at rate p keeps round(n (1-p)^r)."""
    out = []
    for r in range(ROUNDS + 1):
        kept = {n: math.floor(total * (1 - rate) ** r + 0.5) for n, (total, rate) in LAYERS.items()}
        out.append(({n: kept[n] / LAYERS[n][0] for n in kept}, sum(kept.values()) / sum(t for t, _ in LAYERS.values())))
    return out


def runs_of(uri: str, experiment: str = "lottery-tests") -> tuple[MlflowClient, list, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "round"]
    return client, parents, children


def comparable(summary: dict) -> list[dict]:
    """The rounds of a summary without wall-clock times."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in summary["rounds"]]


@pytest.fixture(scope="module")
def uninterrupted(prefect_server, tmp_path_factory):
    """One search run through the CLI (``prune run CONFIG --output-dir DIR``) into its own MLflow store."""
    root = tmp_path_factory.mktemp("lottery")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = root / "lt-test.yaml"
    config.write_text(yaml.safe_dump({**JOB, "tracking": {**JOB["tracking"], "tracking_uri": uri}}))
    rc = prune_main(["run", str(config), "--output-dir", str(root / "out")])
    assert rc == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"uri": uri, "out": root / "out", "summary": summary}


@needs_data
def test_summary_follows_the_schedule(uninterrupted):
    s, out = uninterrupted["summary"], uninterrupted["out"]
    assert s["job"] == "lottery" and s["job_hash"] == parse_config(JOB).job_hash()
    assert [r["round"] for r in s["rounds"]] == list(range(ROUNDS + 1))
    for row, (layers, overall) in zip(s["rounds"], expected_densities(), strict=True):
        assert row["layer_density"] == pytest.approx(layers, rel=1e-12)
        assert row["density"] == pytest.approx(overall, rel=1e-12)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0 and row["seconds"] > 0
        controls = (row["random_reinit_accuracy"], row["random_mask_accuracy"])
        assert controls == (None, None) if row["round"] == 0 else all(0.0 <= a <= 1.0 for a in controls)
    assert s["dense_accuracy"] == s["rounds"][0]["accuracy"] > 0.5  # 60 steps of LeNet already beat chance (0.1)
    ticket_dir = Path(s["ticket_path"])
    assert ticket_dir.parent.parent == out / "tickets" and s["ticket_round"] == ROUNDS
    ticket = load_ticket(ticket_dir)
    assert ticket.round == ROUNDS and ticket.density == pytest.approx(s["ticket_density"], rel=1e-12)
    assert [r.round for r in ticket.records] == list(range(ROUNDS + 1))
    assert s["resumed_from_round"] is None and s["seconds"] >= s["training_seconds"] > 0
    assert (out / "accuracy_vs_density.png").stat().st_size > 10_000


@needs_data
def test_mlflow_parent_and_one_child_per_round(uninterrupted):
    s = uninterrupted["summary"]
    client, parents, children = runs_of(uninterrupted["uri"])
    assert [p.info.run_id for p in parents] == [s["mlflow_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[JOB_TAG] == s["job_hash"]
    assert parent.data.params["search.rewind_strategy"] == "early:10"
    assert sorted(int(c.data.tags["pruning.round"]) for c in children) == list(range(ROUNDS + 1))
    for child in children:
        r = int(child.data.tags["pruning.round"])
        row = s["rounds"][r]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        curve = client.get_metric_history(child.info.run_id, "accuracy")
        assert sorted(m.step for m in curve) == [20, 40, 60]  # one point per evaluation, the last is the final
        assert max(curve, key=lambda m: m.step).value == row["accuracy"]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] != []
        assert child.data.metrics["density"] == pytest.approx(row["density"], rel=1e-12)
        for control in ("random_reinit", "random_mask"):
            assert child.data.metrics.get(f"{control}_accuracy") == row[f"{control}_accuracy"]
            if r > 0:
                assert len(client.get_metric_history(child.info.run_id, f"{control}_loss")) == 3
        table = json.loads(Path(client.download_artifacts(child.info.run_id, "layer_density.json")).read_text())
        assert table["columns"] == ["layer", "density"]
        assert {name: d for name, d in table["data"]} == pytest.approx(row["layer_density"])
    series = client.get_metric_history(parent.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in sorted(series, key=lambda m: m.step)] == [
        (r["round"], r["accuracy"]) for r in s["rounds"]]
    assert parent.data.metrics["dense_accuracy"] == s["dense_accuracy"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_vs_density.png", "rounds.json", "summary.json", "ticket"} <= files
    ticket_files = {a.path for a in client.list_artifacts(parent.info.run_id, "ticket")}
    assert ticket_files == {"ticket/ticket.safetensors", "ticket/ticket.json", "ticket/model.json", "ticket/MLmodel"}


@needs_data
def test_registry_alias_loads_the_winning_ticket_into_a_fresh_model(uninterrupted, tmp_path):
    s, uri = uninterrupted["summary"], uninterrupted["uri"]
    reg = s["registered_model"]
    assert reg == {"name": "lottery-lenet300_100", "version": "1", "alias": "winning",
                   "uri": "models:/lottery-lenet300_100@winning"}
    version = MlflowClient(uri).get_model_version_by_alias(reg["name"], "winning")
    assert str(version.version) == "1" and version.run_id == s["mlflow_run_id"]
    assert version.source == f"runs:/{s['mlflow_run_id']}/ticket" and version.tags["round"] == str(ROUNDS)
    metrics = MlflowClient(uri).get_run(s["mlflow_run_id"]).data.metrics  # rounded, apart from the timings
    assert metrics["headline/ticket_accuracy"] == round(s["ticket_accuracy"], 4)
    model, ticket = load_registered_ticket(reg["name"], "winning", tracking_uri=uri, dst=tmp_path / "dl")
    stored = load_ticket(s["ticket_path"])
    for name, mask in stored.masks.items():
        weight = model.state_dict()[name]
        assert torch.equal(weight, stored.trained_weights[name]) and not weight[~mask].any()
    test = load_fashion_mnist("test").subset(JOB["data"]["test_subset"], seed=0)
    assert evaluate(model, test.images, test.labels)["accuracy"] == s["ticket_accuracy"]
    import mlflow  # the registered directory is also an MLflow pyfunc model

    pyfunc = mlflow.pyfunc.load_model(str(next((tmp_path / "dl").rglob("MLmodel")).parent))
    with torch.no_grad():
        expected = model(test.images[:32]).argmax(dim=-1).numpy()
    assert (pyfunc.predict(test.images[:32].numpy()) == expected).all()


@needs_data
def test_prefect_progress_and_table_artifacts(uninterrupted):
    from prefect.artifacts import Artifact

    key = f"lottery-{uninterrupted['summary']['job_hash']}"
    progress = Artifact.get(f"{key}-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    table = Artifact.get(f"{key}-rounds")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    summary = Artifact.get(f"{key}-summary")  # every job kind's markdown summary and summary table (JobRun.finish)
    assert summary.type == "markdown" and "models:/lottery-lenet300_100@winning" in summary.data
    assert "mlflow ui --backend-store-uri" in summary.data
    assert uninterrupted["summary"]["mlflow_run_id"] in str(Artifact.get(f"{key}-summary-table").data)


@needs_data
def test_crash_in_round_2_resumes_there_with_identical_results(uninterrupted, prefect_server, mlflow_uri, tmp_path):
    job, out = parse_config(JOB), tmp_path / "out"
    crash = Observer(crash_at=(2, "random_mask", 40))  # round 2's IMP and random_reinit runs are done, not committed
    with pytest.raises(SimulatedCrash):
        lottery_flow(job, str(out), on_eval=crash)
    assert {r for r, _, _ in crash.seen} == {0, 1, 2}
    client, parents, children = runs_of(mlflow_uri)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert {c.data.tags["pruning.round"]: c.info.status for c in children} == {
        "0": "FINISHED", "1": "FINISHED", "2": "FAILED"}
    committed = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "round_00" in str(p)}
    assert len(committed) == 6  # rounds 0 and 1: the ticket's two files and the round record
    # As if the crash had also cut round 1's MLflow logging short: its "logged" mark is gone.
    round_1 = next(c for c in children if c.data.tags["pruning.round"] == "1")
    client.delete_tag(round_1.info.run_id, LOGGED_TAG)

    resumed = Observer()
    summary = lottery_flow(job, str(out), on_eval=resumed)
    assert {r for r, _, _ in resumed.seen} == {2, 3}  # no finished round retrained
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items())
    assert summary["resumed_from_round"] == 2
    assert comparable(summary) == comparable(uninterrupted["summary"])
    first, again = load_ticket(uninterrupted["summary"]["ticket_path"]), load_ticket(summary["ticket_path"])
    for group in ("masks", "rewind_weights", "trained_weights"):
        a, b = getattr(first, group), getattr(again, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group

    client, parents, children = runs_of(mlflow_uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["pruning.round"] for c in children) == ["0", "1", "2", "3"]  # no duplicates
    assert all(c.data.tags[LOGGED_TAG] == "true" for c in children)  # round 1 re-recorded, nothing doubled
    for run in [*parents, *children]:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)

    # A completed search run again trains nothing, adds no run and registers no new version.
    idle = Observer()
    again_summary = lottery_flow(job, str(out), on_eval=idle)
    assert idle.seen == [] and comparable(again_summary) == comparable(summary)
    client, parents, children = runs_of(mlflow_uri)
    assert (len(parents), len(children)) == (1, ROUNDS + 1)
    assert [str(v.version) for v in client.search_model_versions("name = 'lottery-lenet300_100'")] == ["1"]


@needs_data
def test_corrupt_newest_checkpoint_redoes_only_that_round(uninterrupted, prefect_server, mlflow_uri, tmp_path):
    """A committed round whose files broke afterwards: the resume starts from the round before it."""
    job, out = parse_config(JOB), tmp_path / "out"
    first = lottery_flow(job, str(out))
    newest = Path(first["ticket_path"]) / "ticket.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    older = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "round_00" in str(p)
             and f"round_{ROUNDS:03d}" not in str(p)}
    assert len(older) == 3 * ROUNDS  # rounds 0..R-1: the ticket's two files and the round record

    seen = Observer()
    summary = lottery_flow(job, str(out), on_eval=seen)
    assert {r for r, _, _ in seen.seen} == {ROUNDS} and summary["resumed_from_round"] == ROUNDS
    assert all(p.stat().st_mtime_ns == t for p, t in older.items())
    assert comparable(summary) == comparable(uninterrupted["summary"])
    ticket = load_ticket(summary["ticket_path"])  # rewritten: loads and equals the uninterrupted search's ticket
    reference = load_ticket(uninterrupted["summary"]["ticket_path"])
    assert all(torch.equal(ticket.trained_weights[k], v) for k, v in reference.trained_weights.items())

    client, parents, children = runs_of(mlflow_uri)
    assert len(parents) == 1 and sorted(c.data.tags["pruning.round"] for c in children) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])  # the reopened round run is closed
    for run in [*parents, *children]:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
    assert [str(v.version) for v in client.search_model_versions("name = 'lottery-lenet300_100'")] == ["1"]


@needs_data
def test_controls_off_and_global_pruning(prefect_server, mlflow_uri, tmp_path):
    unnamed = {k: v for k, v in JOB.items() if k != "name"}
    job = parse_config({**unnamed, "controls": [], "search": {"target_sparsity": 0.5, "pruning_rounds": 1,
                                                              "rewind_strategy": "init", "training_steps": 40},
                        "training": {"eval_every": 20, "threads": 1}})
    summary = lottery_flow(job, str(tmp_path / "out"))
    assert summary["name"] == "lottery-lenet300_100"
    assert [(r["round"], r["density"]) for r in summary["rounds"]] == [(0, 1.0), (1, 0.5)]
    assert all(r["random_reinit_accuracy"] is None and r["random_mask_accuracy"] is None for r in summary["rounds"])
    _, _, children = runs_of(mlflow_uri)
    assert not any(k.startswith("random_") for c in children for k in c.data.metrics)


BAD = [
    ({"target_sparsity": 1.0}, "search.target_sparsity"),
    ({"pruning_rounds": 0}, "search.pruning_rounds"),
    ({"rewind_strategy": "sideways"}, "search.rewind_strategy"),
    ({"rewind_strategy": "early:60"}, "search.rewind_strategy"),  # training_steps is 60
    ({"bogus_key": 1}, "search.bogus_key"),
]


@pytest.mark.parametrize(("change", "field"), BAD, ids=[f for _, f in BAD])
def test_prune_run_rejects_bad_configs_with_exit_code_2(change, field, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**JOB, "search": {**JOB["search"], **change}}))
    assert prune_main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prune: error: Invalid config field") and field in err and str(config) in err
    assert not (tmp_path / "out").exists()


@needs_data
def test_prune_cli_process_exit_code_and_run_time_config_errors(prefect_server, mlflow_uri, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**JOB, "search": {**JOB["search"], "unknown": 1}}))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2 and "search.unknown" in proc.stderr and "Extra inputs" in proc.stderr
    # Errors only the model can reveal surface when the flow starts, with the same exit code.
    config.write_text(yaml.safe_dump({**JOB, "search": {**JOB["search"], "layers": ["hidden.9.weight"]}}))
    assert prune_main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'layers'" in err and "hidden.9.weight" in err
    # An output directory belongs to one job.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**JOB, "search": {**JOB["search"], "seed": 4}}))
    assert prune_main(["run", str(other), "--output-dir", str(tmp_path / "out")]) == 2
    assert "'output_dir'" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_prune_run_killed_with_sigkill_resumes(uninterrupted, prefect_server, mlflow_uri, tmp_path):
    """The real thing: ``prune run`` in a process killed with SIGKILL after round 1, then run again."""
    from prefect.settings import PREFECT_API_URL

    config, out = tmp_path / "lt.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump({**JOB, "tracking": {**JOB["tracking"], "tracking_uri": mlflow_uri}}))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = out / "tickets" / parse_config(JOB).lottery_config().hashname() / "round_001" / "ticket.json"
    deadline = time.monotonic() + 240
    while not committed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and committed.exists()
    assert not (out / "summary.json").exists()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "round_00" in str(p)}

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == 2 and comparable(summary) == comparable(uninterrupted["summary"])
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "round_000" in str(p) or "round_001" in str(p))
    client, parents, children = runs_of(mlflow_uri)
    assert len(parents) == 1 and sorted(c.data.tags["pruning.round"] for c in children) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])
    for run in [*parents, *children]:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
