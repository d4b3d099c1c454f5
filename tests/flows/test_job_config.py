"""Job configs: strict validation, errors that name the field and allowed values, stable hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import OneShotJob, load_config, parse_config
from pruning_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    job = load_config(path)
    assert job.name == path.stem
    assert len(job.job_hash()) == 12


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"method": "wandaa", "sparsity": 0.5}, "method", "'magnitude', 'wanda' or 'sparsegpt'"),
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
