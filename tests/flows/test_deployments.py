"""deployments/prefect.yaml, checked without a server (tests/stack/test_stack.py deploys it to one):
every deployment's job validates with the same models as ``prune run``, the shared job definitions
are the configs/ files, every run is serialized, and entrypoints name real flows."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from prefect.utilities.schema_tools import validate

from flows.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
FLOW_OF_KIND = {"oneshot": "oneshot_flow", "lottery": "lottery_search", "minitron": "minitron_flow"}
# The job definitions shared by deployments (definitions.jobs) and the configs/ file each copies.
SHARED_JOBS = {"wanda_50": "wanda-50.yaml", "sparsegpt_2of4": "sparsegpt-2of4.yaml",
               "lottery_lenet": "lottery-lenet.yaml", "minitron_budget": "minitron-budget.yaml"}


def _comparable(job) -> dict:
    return job.model_dump(mode="json", exclude={"name"})


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_job_validates_and_matches_its_entrypoint(name):
    dep = DEPLOYMENTS[name]
    job = parse_config(dep["parameters"]["job"], source=f"deployment {name}")
    module_path, func = dep["entrypoint"].split(":")
    assert func == FLOW_OF_KIND[job.job]
    flow = getattr(importlib.import_module(module_path.removesuffix(".py").replace("/", ".")), func)
    assert {"job", "output_dir"} <= set(flow.parameters.properties)
    # what the server checks on `prefect deploy` (enforce_parameter_schema): the flow's JSON schema
    validate(dep["parameters"], flow.parameters.model_dump(mode="json"), raise_on_error=True, preprocess=True)
    assert dep["parameters"]["output_dir"]
    assert dep["enforce_parameter_schema"] is True
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert dep["work_pool"]["name"] in {"pruning-process", "pruning-docker", "pruning-k8s"}


@pytest.mark.parametrize("anchor", sorted(SHARED_JOBS))
def test_shared_job_definitions_are_the_config_files(anchor):
    deployed = parse_config(SPEC["definitions"]["jobs"][anchor])
    shipped = load_config(REPO / "configs" / SHARED_JOBS[anchor])
    assert _comparable(deployed) == _comparable(shipped)


def test_output_dirs_are_distinct_and_work_pools_cover_process_docker_kubernetes():
    outs = [d["parameters"]["output_dir"] for d in DEPLOYMENTS.values()]
    assert len(set(outs)) == len(outs)  # a directory is bound to one job
    pools = {d["work_pool"]["name"] for d in DEPLOYMENTS.values()}
    assert pools == {"pruning-process", "pruning-docker", "pruning-k8s"}


def test_schedules_are_valid_utc_crons():
    from prefect.client.schemas.schedules import CronSchedule

    scheduled = {n: d["schedules"] for n, d in DEPLOYMENTS.items() if d.get("schedules")}
    assert "wanda-50-nightly" in scheduled
    for schedules in scheduled.values():
        for s in schedules:
            assert CronSchedule(cron=s["cron"], timezone=s["timezone"]).timezone == "UTC"  # Prefect's validation
    assert scheduled["wanda-50-nightly"][0]["cron"] == "0 2 * * *"


def test_no_credentials_in_the_deployments_file():
    text = (REPO / "deployments" / "prefect.yaml").read_text().lower()
    for word in ("password", "secret", "token", "api_key"):
        assert word not in text, word
