"""The one-shot job's ``recovery`` stage end to end on the tiny random Llama: fixed-mask
distillation after 2:4 pruning, the recovered model becoming the job's model, the loss curve in
MLflow, and a crashed job resuming at its last trainer checkpoint without repeating a step."""

from __future__ import annotations

import json
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
from prefect.settings import PREFECT_API_URL

from flows import llm
from flows.jobs import run_job
from pruning_core.errors import ConfigError
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks
from pruning_core.lm import load_causal_lm
from pruning_core.recovery import RecoveryTrainer
from tests.flows.oneshot_helpers import tiny_job

pytestmark = pytest.mark.flows
REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("recovery_kill_helper.py")
STEPS, EVERY = 12, 4
RECOVERY = {"steps": STEPS, "lr": 2e-3, "windows": 8, "batch_size": 4, "checkpoint_every": EVERY, "schedule": "constant"}


def _job(model_dir):
    return tiny_job(model_dir, method="wanda", pattern="2:4", recovery=RECOVERY, evaluation={"enabled": False},
                    name="recover")


@pytest.fixture(scope="module")
def recovery_run(prefect_server, tiny_model_dir_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    summary = run_job(_job(tiny_model_dir_session), root / "run")
    yield root / "run", summary, root
    mp.undo()


def _weights(model_dir, names):
    model, _ = load_causal_lm(model_dir)
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def test_recovered_model_keeps_masks_and_two_of_four_groups(recovery_run, tiny_model_dir_session):
    run_dir, summary, _ = recovery_run
    masks = load_masks(paths.masks(run_dir))
    recovered = _weights(paths.model(run_dir), masks)
    dense = _weights(tiny_model_dir_session, masks)
    for name, keep in masks.items():
        weight = recovered[name]
        assert bool((weight[~keep] == 0).all()), name  # every pruned weight exactly zero
        assert bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all()), name  # 2:4 groups intact
        assert bool(((~keep).reshape(-1, 4).sum(dim=1) == 2).all()), name
    moved = sum(int((recovered[n][masks[n]] != dense[n][masks[n]]).sum()) for n in masks)
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())  # training changed the kept weights
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-12)


def test_loss_decreases_and_is_logged_per_step(recovery_run):
    run_dir, summary, root = recovery_run
    curve = json.loads(paths.recovery_curve(run_dir).read_text())
    losses = curve["losses"]
    assert curve["steps"] == STEPS and len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "recovery_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "recovery")}
    assert "recovery/loss.png" in logged
    for key in ("recovery", "recovery_state", "recovery_figure", "model"):
        assert Manifest(run_dir).is_complete(key), key
    assert summary["seconds"]["recover"] > 0.0
    assert summary["recovery"]["steps"] == STEPS and summary["recovery"]["loss_last"] == losses[-1]
    assert summary["recovery"]["pruned_weights"] == sum(int((~m).sum()) for m in load_masks(paths.masks(run_dir)).values())
    assert summary["allocation"] is None


def test_training_windows_avoid_the_calibration_windows(recovery_run):
    run_dir, _, _ = recovery_run
    train, calibration = llm.load_windows(run_dir, "recovery"), llm.load_windows(run_dir, "calibration")
    assert train.shape == (8, 32)
    seen = {tuple(w.tolist()) for w in calibration.unfold(1, 8, 1).reshape(-1, 8)}
    assert not any(tuple(w.tolist()) in seen for w in train.unfold(1, 8, 1).reshape(-1, 8))


def test_killed_recovery_resumes_at_its_checkpoint(recovery_run, tiny_model_dir_session, mlflow_uri, tmp_path,
                                                   monkeypatch):
    run_dir, _, _ = recovery_run
    config, killed = tmp_path / "recover.yaml", tmp_path / "run"
    data = _job(tiny_model_dir_session).model_dump(mode="json", by_alias=True, exclude_defaults=True)
    config.write_text(yaml.safe_dump({"job": "oneshot", **data}))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PRUNING_TEST_STEP_DELAY": "1.0"}
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(HELPER), "run", str(config), "--output-dir", str(killed)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
        deadline = time.monotonic() + 240
        while not Manifest(killed).is_complete("recovery_state"):  # the first checkpoint (step 4) is written
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never reached its first recovery checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    resume_at = torch.load(paths.recovery_state(killed), weights_only=True)["step"]
    assert resume_at in range(EVERY, STEPS, EVERY) and not Manifest(killed).is_complete("recovery")
    real, started = RecoveryTrainer.train_step, []
    monkeypatch.setattr(RecoveryTrainer, "train_step", lambda self: (started.append(self.step), real(self))[1])
    run_job(_job(tiny_model_dir_session), killed)
    assert started == list(range(resume_at, STEPS))  # resumed at the checkpoint, no step twice
    masks = load_masks(paths.masks(run_dir))
    ours, uninterrupted = _weights(paths.model(killed), masks), _weights(paths.model(run_dir), masks)
    assert all(torch.equal(ours[n], uninterrupted[n]) for n in masks)  # bit-identical to the uninterrupted run
    # the killed part ran in another process (its own thread count): losses agree to float rounding
    ours_curve, reference = (json.loads(paths.recovery_curve(d).read_text()) for d in (killed, run_dir))
    assert ours_curve.pop("losses") == pytest.approx(reference.pop("losses"), rel=1e-5)
    assert ours_curve == reference


def test_recovery_on_the_evaluation_text_is_refused(tiny_model_dir_session):
    with pytest.raises(ConfigError, match="must differ from the evaluation"):
        tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.5, recovery={"steps": 2},
                 evaluation={"text": "emma"})


def test_bfloat16_model_recovers_in_bfloat16(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    model, tokenizer = load_causal_lm(tiny_model_dir_session)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    job = tiny_job(tmp_path / "bf16", method="wanda", sparsity=0.5, evaluation={"enabled": False}, name="bf16",
                   recovery={**RECOVERY, "steps": 4, "checkpoint_every": 2})
    run_job(job, tmp_path / "run")
    recovered, _ = load_causal_lm(paths.model(tmp_path / "run"))
    masks = load_masks(paths.masks(tmp_path / "run"))
    for name, keep in masks.items():
        weight = recovered.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16 and bool((weight[~keep] == 0).all()), name
    losses = json.loads(paths.recovery_curve(tmp_path / "run").read_text())["losses"]
    assert len(losses) == 4 and all(0.0 <= x < 100.0 for x in losses)
