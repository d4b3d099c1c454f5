"""The Python API builds the very job the YAML builds (both ways, every job kind) and runs the same flow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import pruning_pipeline as pp
from flows.jobs import JOBS, load_config
from pruning_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
BUILDERS = {"oneshot": pp.oneshot_job, "minitron": pp.minitron_job, "lottery": pp.lottery_job}
SMALL = {
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4, "error_windows": 2},
    "device": "cpu",
}


def test_every_job_kind_has_a_function():
    assert set(BUILDERS) == set(JOBS)
    for kind in JOBS:
        assert callable(getattr(pp, kind))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_yaml_and_api_build_the_same_job(config):
    """Every shipped config, given to the API as keyword arguments, is the same job object and hash."""
    from_yaml = load_config(config)
    data = yaml.safe_load(config.read_text())
    kind = data.pop("job", "oneshot")
    from_api = BUILDERS[kind](**{**data, "name": config.stem})
    assert from_api == from_yaml
    assert from_api.job_hash() == from_yaml.job_hash()


@pytest.mark.parametrize("kind, kwargs", [
    ("oneshot", {"model": "smollm2", "method": "sparsegpt", "pattern": "2:4",
                 "calibration": {"num_windows": 16, "mode": "sequential"}, "runner": {"kind": "dask_local"}}),
    ("oneshot", {"method": "magnitude", "sparsity": 0.7, "scope": "global"}),
    ("minitron", {"target": {"layers": [24]}, "depth_criterion": "bi", "distillation": {"steps": 2}}),
    ("lottery", {"model": "conv2", "search": {"pruning_rounds": 2, "training_steps": 10}}),
])
def test_api_job_round_trips_through_yaml(kind, kwargs, tmp_path):
    """The other way: the API's job, written as YAML, reads back as the same job."""
    job = BUILDERS[kind](**kwargs, name="round-trip")
    file = tmp_path / "round-trip.yaml"
    file.write_text(yaml.safe_dump({"job": kind, **job.model_dump(mode="json", exclude_defaults=True)}))
    assert load_config(file) == job
    assert load_config(file).job_hash() == job.job_hash()


def test_api_defaults():
    job = pp.oneshot_job()
    assert (job.model, job.method, job.target_sparsity, job.pattern) == ("smollm2", "wanda", 0.5, "unstructured")
    assert pp.oneshot_job(pattern="1:4").target_sparsity == 0.75  # N:M implies its sparsity
    section = pp.oneshot_job().calibration.model_copy(update={"num_windows": 4})
    assert pp.oneshot_job(calibration=section) == pp.oneshot_job(calibration={"num_windows": 4})


@pytest.mark.parametrize("kind, kwargs, field", [
    ("oneshot", {"colour": "red"}, "colour"),
    ("oneshot", {"calibration": {"num_windowz": 4}}, "calibration.num_windowz"),
    ("oneshot", {"sparsity": 1.5}, "sparsity"),
    ("minitron", {"target": {"layers": [24]}, "depth": 3}, "depth"),
    ("minitron", {}, "target"),
    ("lottery", {"search": {"rounds": 3}}, "search.rounds"),
])
def test_bad_options_raise_the_yaml_error(kind, kwargs, field, tmp_path):
    """An unknown or invalid option is the same ConfigError, naming the same field, as in a YAML file."""
    with pytest.raises(ConfigError) as api_error:
        BUILDERS[kind](**kwargs)
    file = tmp_path / "bad.yaml"
    defaults = {"oneshot": {"method": "wanda", "sparsity": 0.5}, "minitron": {}, "lottery": {}}[kind]
    file.write_text(yaml.safe_dump({"job": kind, **defaults, **kwargs}))
    with pytest.raises(ConfigError) as yaml_error:
        load_config(file)
    assert api_error.value.field == yaml_error.value.field == field


@pytest.mark.flows
def test_oneshot_end_to_end_on_a_tiny_model(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    """One real call: the flow runs, the summary comes back, the returned model is the pruned one."""
    summary, (model, tokenizer) = pp.oneshot(str(tiny_model_dir_session), method="magnitude", sparsity=0.5,
                                             output_dir=tmp_path / "run", return_model=True, name="api", **SMALL)
    assert summary["method"] == "magnitude" and summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["job_hash"] == pp.oneshot_job(str(tiny_model_dir_session), "magnitude", 0.5, **SMALL).job_hash()
    assert (tmp_path / "run" / "summary.json").is_file()
    weight = model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert tokenizer("Emma")["input_ids"]
    again = pp.oneshot(str(tiny_model_dir_session), method="magnitude", output_dir=tmp_path / "run", name="api",
                       **SMALL)  # the same arguments resume the finished job
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    from mlflow import MlflowClient  # the rerun added no second headline point, input or model version

    client = MlflowClient(mlflow_uri)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "headline/sparsity")) == 1
    assert len(client.get_run(summary["mlflow_run_id"]).inputs.dataset_inputs) == 2
    assert again["registered_model"] == summary["registered_model"]
    assert isinstance(model, torch.nn.Module)


def test_a_hub_id_resolves_to_the_local_hub_cache_only(tiny_model_dir_session, tmp_path, monkeypatch):
    """``model="org/name"`` (API or YAML) is read from the Hugging Face cache; nothing downloads."""
    import shutil

    import huggingface_hub.constants

    from flows import llm

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir_session, snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert pp.oneshot_job("tiny-org/tiny-llama").model == "tiny-org/tiny-llama"
    assert llm.model_dir("tiny-org/tiny-llama") == str(snapshot.resolve())
    with pytest.raises(ConfigError, match="local hub cache") as err:
        llm.model_dir("tiny-org/not-downloaded")
    assert err.value.field == "model"
    assert llm.model_dir(str(tiny_model_dir_session)) == str(tiny_model_dir_session.resolve())
