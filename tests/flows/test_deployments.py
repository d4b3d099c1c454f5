"""deployments/prefect.yaml, checked without a server (tests/stack/test_stack.py deploys it to one):
every deployment's job validates with the same models as ``prune run``, the shared job definitions
are the configs/ files, every run is serialized, entrypoints name real flows, every flow run gets a
directory of its own (on a volume in containers), the process pool's working directory is found on
the worker, the Kubernetes job template mounts the runs volume, and the README's commands create
every work pool the deployments need."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import yaml
from prefect.utilities.schema_tools import validate

from flows.deploy_steps import project_dir, set_working_directory
from flows.jobs import load_config, parse_config
from tests.readme_blocks import deployment_commands, setup_commands

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
FLOW_OF_KIND = {"oneshot": "oneshot_flow", "lottery": "lottery_flow", "minitron": "minitron_flow"}
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
    assert flow.parameters.required == ["job"]  # output_dir is optional: default, one directory per flow run
    # what the server checks on `prefect deploy` (enforce_parameter_schema): the flow's JSON schema
    validate(dep["parameters"], flow.parameters.model_dump(mode="json"), raise_on_error=True, preprocess=True)
    assert "output_dir" not in dep["parameters"]  # a pinned directory would make every run resume the first
    assert dep["enforce_parameter_schema"] is True
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert dep["work_pool"]["name"] in {"pruning-process", "pruning-docker", "pruning-k8s"}


@pytest.mark.parametrize("anchor", sorted(SHARED_JOBS))
def test_shared_job_definitions_are_the_config_files(anchor):
    deployed = parse_config(SPEC["definitions"]["jobs"][anchor])
    shipped = load_config(REPO / "configs" / SHARED_JOBS[anchor])
    assert _comparable(deployed) == _comparable(shipped)


def test_work_pools_cover_process_docker_kubernetes_and_container_runs_land_on_volumes():
    pools = {d["work_pool"]["name"] for d in DEPLOYMENTS.values()}
    assert pools == {"pruning-process", "pruning-docker", "pruning-k8s"}
    for name, dep in DEPLOYMENTS.items():
        variables = dep["work_pool"].get("job_variables", {})
        runs_dir = variables.get("env", {}).get("PRUNING_RUNS_DIR")
        if dep["work_pool"]["name"] == "pruning-process":
            assert runs_dir is None, name  # default runs/deployed in the worker's working directory
        elif dep["work_pool"]["name"] == "pruning-docker":
            assert f"pruning-runs:{runs_dir}" in variables["volumes"], name  # the compose stack's runs volume
        else:
            assert runs_dir == K8S_MOUNTS["pruning-data:runs"], name
            assert variables["runs_pvc"] == PVC["metadata"]["name"]


# -- where a process-pool run works: resolved on the worker, not baked in by `prefect deploy` -------
def test_process_pool_pull_step_is_resolved_on_the_worker():
    assert SPEC["pull"] == [{"flows.deploy_steps.set_working_directory": {}}]
    assert "{{ $" not in json.dumps(SPEC["pull"])  # no env placeholder filled in on the deploying host
    for name, dep in DEPLOYMENTS.items():
        if dep["work_pool"]["name"] != "pruning-process":  # containers: the image's project directory
            want = [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/pruning"}}]
            assert dep["pull"] == want, name
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        assert "PRUNING_WORKDIR=/opt/pruning" in (REPO / "docker" / dockerfile).read_text()
    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())["services"]["prefect-worker"]
    assert compose["environment"]["PRUNING_WORKDIR"] == compose["working_dir"] == "/opt/pruning"


def test_pull_step_uses_PRUNING_WORKDIR_else_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored afterwards, as set_working_directory changes it
    monkeypatch.delenv("PRUNING_WORKDIR", raising=False)
    assert project_dir() == REPO  # the checkout flows/ was imported from
    assert set_working_directory() == {"directory": str(REPO)} and Path.cwd() == REPO
    worker_copy = tmp_path / "opt-pruning"
    (worker_copy / "flows").mkdir(parents=True)
    monkeypatch.setenv("PRUNING_WORKDIR", str(worker_copy))
    assert set_working_directory() == {"directory": str(worker_copy)} and Path(os.getcwd()) == worker_copy
    monkeypatch.setenv("PRUNING_WORKDIR", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="PRUNING_WORKDIR"):
        set_working_directory()


# -- Kubernetes: outputs on a PersistentVolumeClaim -----------------------------------------------
K8S_TEMPLATE = json.loads((REPO / "deployments" / "k8s-job-template.json").read_text())
PVC = yaml.safe_load((REPO / "deployments" / "k8s-runs-pvc.yaml").read_text())
_POD = K8S_TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
K8S_MOUNTS = {f"{m['name']}:{m.get('subPath', '')}": m["mountPath"] for m in _POD["containers"][0]["volumeMounts"]}


def test_k8s_job_template_mounts_the_runs_pvc():
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(K8S_TEMPLATE)  # what the server checks on `work-pool create --base-job-template`
    volumes = {v["name"]: v for v in _POD["volumes"]}
    assert volumes["pruning-data"]["persistentVolumeClaim"]["claimName"] == "{{ runs_pvc }}"
    variables = K8S_TEMPLATE["variables"]["properties"]
    assert variables["runs_pvc"]["default"] == PVC["metadata"]["name"]
    assert K8S_MOUNTS["pruning-data:runs"] == "/data/runs"  # the image's VOLUME, where runs go
    assert K8S_MOUNTS["pruning-data:cache"] == "/home/pruner/.cache/pruning-pipeline"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and K8S_MOUNTS["dshm:"] == "/dev/shm"
    assert _POD["securityContext"]["fsGroup"] == 10001  # the image's user can write to the volume
    k8s = [d for d in DEPLOYMENTS.values() if d["work_pool"]["name"] == "pruning-k8s"]
    assert k8s and all(d["work_pool"]["job_variables"]["namespace"] == PVC["metadata"]["namespace"] for d in k8s)
    assert "ReadWriteMany" in PVC["spec"]["accessModes"]


# -- the documented commands ------------------------------------------------------------------------
def test_readme_creates_every_work_pool_the_deploy_needs():
    commands = setup_commands()
    deploy = commands[-1]
    assert deploy[:2] == ["prefect", "--no-prompt"] and "deploy" in deploy and "--all" in deploy
    assert deploy[deploy.index("--prefect-file") + 1] == "deployments/prefect.yaml"
    created = {}
    for argv in commands[:-1]:
        assert argv[:3] == ["prefect", "work-pool", "create"], argv
        created[argv[3]] = argv[argv.index("--type") + 1]
        if "--base-job-template" in argv:
            assert (REPO / argv[argv.index("--base-job-template") + 1]).is_file()
    needed = {d["work_pool"]["name"] for d in DEPLOYMENTS.values()}
    assert created == {"pruning-process": "process", "pruning-docker": "docker", "pruning-k8s": "kubernetes"}
    assert needed <= set(created)
    k8s = next(argv for argv in commands if "pruning-k8s" in argv)
    assert k8s[k8s.index("--base-job-template") + 1] == "deployments/k8s-job-template.json"
    assert ["prefect", "worker", "start", "--pool", "pruning-process"] in deployment_commands()


def test_compose_header_and_prefect_yaml_repeat_the_readme_commands():
    compose_header = " ".join((REPO / "docker" / "compose.yml").read_text().split())
    yaml_header = " ".join((REPO / "deployments" / "prefect.yaml").read_text().replace("\\\n#", "").split())
    for argv in setup_commands():
        assert " ".join(argv) in compose_header, argv
        if argv[1] == "work-pool":
            assert " ".join(argv[:6]) in yaml_header, argv


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
