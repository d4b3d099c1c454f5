"""Job configs: strict validation, errors that name the field and allowed values, stable hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.jobs import load_config, parse_config
from flows.oneshot import OneShotJob
from pruning_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    job = load_config(path)
    assert job.name == path.stem
    assert len(job.job_hash()) == 12


def test_a_method_added_to_the_registry_is_a_valid_job_method(monkeypatch):
    """Adding a method is one file plus one registry line: the job config takes it from the registry
    (its name, its default scope, the scopes it supports), with nothing else to change."""
    from pruning_core.methods import registry
    from tests.methods.toy_method import SmallestFirst

    with pytest.raises(ConfigError, match="unknown method 'smallest_first'"):
        parse_config({"method": "smallest_first", "sparsity": 0.5})
    monkeypatch.setitem(registry.METHODS, "smallest_first", SmallestFirst)
    job = parse_config({"method": "smallest_first", "sparsity": 0.5, "scope": "global"})
    assert job.method == "smallest_first" and job.mask_scope == "global"
    assert parse_config({"method": "smallest_first", "sparsity": 0.5}).mask_scope == "layer"
    assert parse_config({"method": "wanda", "sparsity": 0.5}).mask_scope == "row"


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"method": "wandaa", "sparsity": 0.5}, "method", "registered: 'magnitude', 'wanda', 'sparsegpt'"),
        ({"method": "wanda", "sparsity": 1.0}, "sparsity", "less than 1"),
        ({"method": "wanda", "sparsity": -0.1}, "sparsity", "greater than or equal to 0"),
        ({"method": "wanda", "pattern": "2:4", "sparsity": 0.6}, "sparsity", "fixes it at 0.5"),
        ({"method": "wanda"}, "sparsity", "required"),
        ({"method": "wanda", "sparsity": 0.5, "bogus": 1}, "bogus", "Extra inputs are not permitted"),
        ({"method": "wanda", "pattern": "3:0"}, "pattern", "M must be > 0"),
        ({"method": "wanda", "pattern": "block:0x4", "sparsity": 0.5}, "pattern", "block size must be positive"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": {"num_windows": 0}}, "calibration.num_windows", "greater than 0"),
        ({"method": "wanda", "sparsity": 0.5, "runner": {"kind": "dask"}}, "runner", "scheduler address"),
        ({"method": "wanda", "sparsity": 0.5, "device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"job": "nope"}, "job", "allowed: lottery, minitron, oneshot"),
        ({"method": "sparsegpt", "pattern": "row", "sparsity": 0.5}, "pattern", "unstructured and N:M"),
        ({"method": "sparsegpt", "sparsity": 0.5, "scope": "row"}, "scope", "(allowed: layer)"),
        ({"method": "wanda", "sparsity": 0.5, "dtype": "fp32"}, "dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"job": "minitron", "target": {"layers": [24]}, "dtype": "int8"}, "dtype", "'float16'"),
        ({"method": "wanda", "sparsity": 0.5, "revision": "../x"}, "revision", "not a revision"),
        ({"method": "wanda", "sparsity": 0.5, "revision": "main"}, "revision", "not the shipped smollm2"),
    ],
)
def test_bad_configs_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "job.yaml")
    assert err.value.field == field
    assert fragment in str(err.value)
    assert "job.yaml" in str(err.value)


def test_hash_ignores_defaults_runner_and_tracking():
    base = parse_config({"method": "wanda", "sparsity": 0.5})
    same = parse_config({"method": "wanda", "sparsity": 0.5, "scope": None, "calibration": {"seed": 0},
                         "runner": {"kind": "dask_local"}, "tracking": {"experiment": "other"}})
    other = parse_config({"method": "wanda", "sparsity": 0.5, "calibration": {"seed": 1}})
    assert base.job_hash() == same.job_hash()
    assert base.job_hash() != other.job_hash()
    # Pinned: changing this hash silently orphans every existing run directory and MLflow run.
    assert base.job_hash() == "5bad82bd49cc"


def test_dtype_and_revision_enter_the_hash_only_when_given():
    base = parse_config({"model": "org/name", "method": "wanda", "sparsity": 0.5})
    auto = parse_config({"model": "org/name", "method": "wanda", "sparsity": 0.5, "dtype": "auto", "revision": None})
    cast = parse_config({"model": "org/name", "method": "wanda", "sparsity": 0.5, "dtype": "float32"})
    pinned = parse_config({"model": "org/name", "method": "wanda", "sparsity": 0.5, "revision": "0123abcd"})
    assert base.job_hash() == auto.job_hash() and len({base.job_hash(), cast.job_hash(), pinned.job_hash()}) == 3
    assert parse_config({"method": "wanda", "sparsity": 0.5, "dtype": "auto"}).job_hash() == "5bad82bd49cc"


def test_nm_pattern_implies_sparsity_and_scope_defaults():
    job = parse_config({"method": "sparsegpt", "pattern": "2:4"})
    assert isinstance(job, OneShotJob)
    assert job.target_sparsity == 0.5
    assert job.mask_scope == "layer"
    assert parse_config({"method": "wanda", "sparsity": 0.5}).mask_scope == "row"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# Pinned identities of the shipped configs and of the deployments' jobs: a job's hash names its
# output directory and finds its MLflow run, so moving or renaming code must never change it.
SHIPPED_HASHES = {
    "default.yaml": "bb6d8831db97", "lottery-conv2-quick.yaml": "915967ce95c4",
    "lottery-lenet-quick.yaml": "afe84328c652", "lottery-lenet.yaml": "78039a0e111c",
    "magnitude-50.yaml": "7bb2030584cb", "minitron-budget.yaml": "ceb3dfb75daf",
    "minitron-depth.yaml": "8738a7a0410a", "minitron-width.yaml": "757f5c673aa1",
    "sparsegpt-2of4.yaml": "a414c943a436", "sparsegpt-50.yaml": "85c6f645a33b",
    "wanda-2of4.yaml": "ede78c1c7155", "wanda-50.yaml": "bb6d8831db97",
}


def test_shipped_config_hashes_are_pinned():
    assert {p.name: load_config(p).job_hash() for p in sorted((REPO / "configs").glob("*.yaml"))} == SHIPPED_HASHES


def test_deployment_job_hashes_are_pinned():
    import yaml

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    hashes = {d["name"]: parse_config(d["parameters"]["job"]).job_hash() for d in spec["deployments"]}
    assert hashes == {
        "wanda-50-nightly": "bb6d8831db97", "sparsegpt-2of4": "a414c943a436", "wanda-50-docker": "bb6d8831db97",
        "sparsegpt-2of4-gpu": "46043c4e03b5", "wanda-50-k8s": "bb6d8831db97", "lenet-fashion-mnist": "78039a0e111c",
        "lenet-fashion-mnist-docker": "78039a0e111c", "minitron-budget-weekly": "ceb3dfb75daf",
        "minitron-budget-dask": "ceb3dfb75daf",
    }


def test_validate_imports_neither_prefect_nor_mlflow():
    """``prune validate`` reads the registry's config models only (the flows import Prefect and MLflow)."""
    import subprocess
    import sys

    code = ("import sys; from flows.cli import main; rc = main(['validate', sys.argv[1]]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')); "
            "sys.stderr.write(repr(heavy)); raise SystemExit(rc)")
    for config in ("default.yaml", "minitron-budget.yaml", "lottery-lenet.yaml"):
        proc = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / config)], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0 and proc.stderr.endswith("[]"), (config, proc.stderr[-2000:])
        assert "job hash:" in proc.stdout
