"""The one-shot job's ``allocation`` section end to end on the tiny random Llama: OWL computed
streaming from the dense model, saved, logged, and used by the prune tasks; ``kind: file`` reuses
it; bad allocations fail before long work."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flows import llm
from flows.jobs import parse_config, run_job
from pruning_core.allocation import Allocation, OWLConfig, allocation_units, owl_allocation
from pruning_core.calibration import collect_activation_stats
from pruning_core.errors import ConfigError
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks
from pruning_core.lm import load_causal_lm
from tests.flows.oneshot_helpers import tiny_job

pytestmark = pytest.mark.flows
S, LAM = 0.5, 0.08
OWL = {"kind": "owl", "m": 3.0, "lambda": LAM, "granularity": "layer"}


@pytest.fixture(scope="module")
def owl_run(prefect_server, tiny_model_dir_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    job = tiny_job(tiny_model_dir_session, method="wanda", sparsity=S, allocation=OWL, name="owl")
    summary = run_job(job, root / "run")
    yield job, root / "run", summary, root
    mp.undo()


def _sparsities(run_dir) -> dict[str, float]:
    return {name: 1.0 - float(mask.float().mean()) for name, mask in load_masks(paths.masks(run_dir)).items()}


def test_owl_allocation_averages_the_target_inside_the_band(owl_run):
    _, run_dir, summary, _ = owl_run
    allocation = Allocation.from_dict(json.loads(paths.allocation(run_dir).read_text()))
    assert allocation.source == "owl" and len(allocation.units) == 14  # 2 blocks x 7 layers
    assert allocation.mean == pytest.approx(S, abs=1e-12)
    assert all(S - LAM - 1e-12 <= s <= S + LAM + 1e-12 for s in allocation.sparsities)
    assert max(allocation.sparsities) - min(allocation.sparsities) > 0.01  # really non-uniform
    # each row rounds down to a whole weight; one-layer units cannot make that up (pruning_core.allocation.rounding)
    assert S - 1.0 / 64 < summary["sparsity"] <= S + 1e-12


def test_streaming_owl_equals_owl_on_the_whole_model(owl_run, tiny_model_dir_session):
    _, run_dir, _, _ = owl_run
    model, _ = load_causal_lm(tiny_model_dir_session)
    ctx = collect_activation_stats(model, llm.window_batches(run_dir, "calibration", 4), progress=False)
    reference = owl_allocation(model, ctx, allocation_units(model, "layer"), S, OWLConfig(m=3.0, lam=LAM))
    saved = Allocation.from_dict(json.loads(paths.allocation(run_dir).read_text()))
    assert saved.units == reference.units
    assert saved.sparsities == pytest.approx(reference.sparsities, abs=1e-9)


def test_pruned_layers_have_their_rounded_allocated_sparsity(owl_run):
    _, run_dir, _, _ = owl_run
    targets = json.loads(paths.allocation_targets(run_dir).read_text())
    assert targets["scope"] == "row"
    sparsities = _sparsities(run_dir)
    assert set(sparsities) == set(targets["targets"])
    for name, target in targets["targets"].items():
        assert sparsities[name] == pytest.approx(target, abs=1e-12), name
    allocation = Allocation.from_dict(json.loads(paths.allocation(run_dir).read_text()))
    for unit, s in zip(allocation.units, allocation.sparsities, strict=True):  # within one row step
        assert abs(sparsities[unit.name] - s) <= 1.0 / 64 + 1e-12


def test_allocation_is_recorded_and_logged(owl_run):
    job, run_dir, summary, root = owl_run
    manifest = Manifest(run_dir)
    for key in ("allocation", "allocation_targets", "allocation_figure"):
        assert manifest.is_complete(key), key
    assert paths.allocation_figure(run_dir).read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "allocation")}
    assert logged == {"allocation/allocation.json", "allocation/allocation.png"}
    assert summary["seconds"]["allocate"] >= 0.0
    on_disk = json.loads(paths.summary(run_dir).read_text())["allocation"]
    assert on_disk["kind"] == "owl" and on_disk["units"] == 14 and on_disk["mean"] == pytest.approx(S, abs=1e-12)
    assert S - LAM - 1e-12 <= on_disk["min"] < on_disk["max"] <= S + LAM + 1e-12


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_file_allocation_reuses_it_with_identical_masks(owl_run, tiny_model_dir_session, mlflow_uri, tmp_path, mode):
    _, owl_dir, _, _ = owl_run
    job = tiny_job(tiny_model_dir_session, method="wanda", sparsity=S, name="reuse", calibration={
        "num_windows": 8, "window_length": 32, "batch_size": 4, "mode": mode},
        allocation={"kind": "file", "path": str(paths.allocation(owl_dir))}, evaluation={"enabled": False})
    run_job(job, tmp_path / "run")
    saved = json.loads(paths.allocation(tmp_path / "run").read_text())
    assert saved["sparsities"] == json.loads(paths.allocation(owl_dir).read_text())["sparsities"]
    targets = json.loads(paths.allocation_targets(owl_dir).read_text())["targets"]
    if mode == "one_pass":  # the same statistics: the very same masks
        ours, theirs = load_masks(paths.masks(tmp_path / "run")), load_masks(paths.masks(owl_dir))
        assert all(bool((ours[n] == theirs[n]).all()) for n in theirs)
    else:  # block by block: other statistics, the same per-layer sparsities
        assert _sparsities(tmp_path / "run") == pytest.approx(targets, abs=1e-12)


def test_file_allocation_of_another_model_fails_before_pruning(owl_run, tiny_model_dir_session, mlflow_uri, tmp_path):
    _, owl_dir, _, _ = owl_run
    data = json.loads(paths.allocation(owl_dir).read_text())
    data["units"], data["sparsities"] = data["units"][:-1], data["sparsities"][:-1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    job = tiny_job(tiny_model_dir_session, method="wanda", sparsity=S, allocation={"kind": "file", "path": str(other)},
                   evaluation={"enabled": False})
    with pytest.raises(ConfigError, match="other units"):
        run_job(job, tmp_path / "run")
    assert not paths.layer_scores(tmp_path / "run", "model.layers.0.mlp.up_proj").exists()


def test_file_allocation_for_another_sparsity_is_a_config_error(owl_run, tiny_model_dir_session, tmp_path):
    _, owl_dir, _, _ = owl_run
    with pytest.raises(ConfigError, match="averages 0.5, the job's sparsity is 0.4"):
        tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.4,
                 allocation={"kind": "file", "path": str(paths.allocation(owl_dir))})
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an allocation.json"):
        tiny_job(tiny_model_dir_session, method="wanda", sparsity=0.5,
                 allocation={"kind": "file", "path": str(tmp_path / "bad.json")})


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"pattern": "2:4", "allocation": {"kind": "owl"}}, "unstructured pattern"),
    ({"sparsity": 0.5, "scope": "global", "method": "magnitude", "allocation": {"kind": "owl"}}, "scope global"),
    ({"sparsity": 0.95, "allocation": {"kind": "owl", "lambda": 0.08}}, "must lie in"),
    ({"sparsity": 0.5, "allocation": {"kind": "file", "path": "/no/such/allocation.json"}}, "no such file"),
    ({"sparsity": 0.5, "allocation": {"kind": "file"}}, "required for kind file"),
    ({"sparsity": 0.5, "allocation": {"kind": "owl", "path": "x.json"}}, "only for kind file"),
    ({"sparsity": 0.5, "allocation": {"kind": "owl", "generations": 3}}, "generations: only for kind search"),
    ({"pattern": "2:4", "allocation": {"kind": "search"}}, "unstructured pattern"),
    ({"sparsity": 0.95, "allocation": {"kind": "search", "lambda": 0.08}}, "must lie in"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "offspring": 4, "survivors": 5}}, "survivors: 5 > offspring 4"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "fitness_windows": [2, 9]}}, "the calibration has 8"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "fitness_windows": [4, 2]}}, "more than stage 1"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "fitness_windows": [2]}}, "fitness_windows"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "level_step": 0}}, "level_step"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "generations": 0}}, "generations"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "fitness": "ppl"}}, "fitness"),
    ({"sparsity": 0.5, "allocation": {"kind": "search", "start": "file"}}, "start"),
])
def test_bad_allocation_sections_are_config_errors(tiny_model_dir_session, fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_job(tiny_model_dir_session, **{"method": "wanda", **fields})


def test_uniform_default_keeps_the_job_hash(tiny_model_dir_session):
    plain = tiny_job(tiny_model_dir_session, method="wanda", sparsity=S)
    explicit = tiny_job(tiny_model_dir_session, method="wanda", sparsity=S, allocation={"kind": "uniform"})
    assert plain.job_hash() == explicit.job_hash()
    assert plain.job_hash() != tiny_job(tiny_model_dir_session, method="wanda", sparsity=S, allocation=OWL).job_hash()
    # pinned before the search fields existed: they leave the identity of OWL jobs unchanged
    assert parse_config({"method": "wanda", "sparsity": S, "allocation": OWL}, "t.yaml").job_hash() == "c0f3b5cc9e1f"
    search = parse_config({"method": "wanda", "sparsity": S, "allocation": {**OWL, "kind": "search"}}, "t.yaml")
    assert search.job_hash() != parse_config({"method": "wanda", "sparsity": S, "allocation": OWL}, "t.yaml").job_hash()


def test_owl_per_block_with_sequential_sparsegpt(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path):
    job = tiny_job(tiny_model_dir_session, method="sparsegpt", sparsity=S, evaluation={"enabled": False},
                   calibration={"num_windows": 8, "window_length": 32, "batch_size": 4, "mode": "sequential"},
                   allocation={"kind": "owl", "m": 3.0, "lambda": LAM})
    summary = run_job(job, tmp_path / "run")
    allocation = Allocation.from_dict(json.loads(paths.allocation(tmp_path / "run").read_text()))
    assert [u.name for u in allocation.units] == ["model.layers.0", "model.layers.1"]
    assert allocation.mean == pytest.approx(S, abs=1e-12) and allocation.sparsities[0] != allocation.sparsities[1]
    targets = json.loads(paths.allocation_targets(tmp_path / "run").read_text())
    assert targets["scope"] == "layer"
    sparsities = _sparsities(tmp_path / "run")
    for unit, s in zip(allocation.units, allocation.sparsities, strict=True):
        for name in unit.layers:  # LAYER scope; SparseGPT selects per column block: within a few weights
            assert sparsities[name] == pytest.approx(targets["targets"][name], abs=2e-3)
            assert abs(sparsities[name] - s) < 1e-3
    assert summary["sparsity"] == pytest.approx(S, abs=1e-3)
