"""``device: auto`` (the default): CUDA in every task when present, CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from flows.jobs import run_job as run_oneshot
from pruning_core.io.masks import load_masks
from pruning_core.masks import NM
from tests.flows.oneshot_helpers import SMALL, tiny_job

pytestmark = pytest.mark.flows
NO_EVAL = {**SMALL["evaluation"], "enabled": False}


def _spy_devices(monkeypatch) -> list[str]:
    """Record the device of every decoder block read and every per-unit weight the tasks prune."""
    import flows.oneshot.tasks as tasks
    from pruning_core.lm import CheckpointReader

    seen: list[str] = []
    real_block, real_prune = CheckpointReader.load_block, tasks.prune_one

    def block(self, *args, **kwargs):
        module = real_block(self, *args, **kwargs)
        seen.append(f"block:{next(module.parameters()).device.type}")
        return module

    def prune(job, weight, *args, **kwargs):
        seen.append(f"weight:{weight.device.type}")
        return real_prune(job, weight, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "load_block", block)
    monkeypatch.setattr(tasks, "prune_one", prune)
    return seen


def test_auto_runs_sequential_mode_on_cpu(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path, monkeypatch):
    """The default device reached ``Module.to_empty(device="auto")`` in sequential mode and failed."""
    seen = _spy_devices(monkeypatch)
    job = tiny_job(tiny_model_dir_session, method="wanda", pattern="2:4", device="auto", evaluation=NO_EVAL,
                   calibration={**SMALL["calibration"], "mode": "sequential"})
    summary = run_oneshot(job, tmp_path / "run")
    assert summary["sparsity"] == pytest.approx(0.5)
    for name, mask in load_masks(tmp_path / "run" / "masks.safetensors").items():
        NM(2, 4).validate(mask, name=name)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {s.split(":")[0] for s in seen} == {"block", "weight"}  # streamed blocks, units pruned inside them
    assert {s.split(":")[1] for s in seen} == {expected}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_auto_uses_cuda_in_every_task(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path, monkeypatch, mode):
    seen = _spy_devices(monkeypatch)
    job = tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.5, device="auto",
                   calibration={**SMALL["calibration"], "mode": mode})
    summary = run_oneshot(job, tmp_path / "run")
    kinds = {s.split(":")[0] for s in seen}
    assert kinds == {"block", "weight"}
    assert {s.split(":")[1] for s in seen} == {"cuda"}, seen
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert 1.0 < summary["perplexity_before"] < summary["perplexity_after"] < 1e4
