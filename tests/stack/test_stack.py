"""The production topology end to end, without containers: scripts/stack.sh starts PostgreSQL,
the Prefect and MLflow servers on it, a Dask scheduler with two workers and a Prefect process
worker; deployments/prefect.yaml is deployed to the server with the README's commands as written;
a deployment is triggered through the server and its run is checked where it should have left
traces: its own output directory, the Dask scheduler's task stream (the per-layer tasks ran on the
stack's workers), Prefect's task runs, and the MLflow server over HTTP (the run, its metrics, its
artifacts). Last, ``stack.sh stop`` must leave no process of the stack alive and no port open.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.readme_blocks import setup_commands

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
SMALL = {
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4, "error_windows": 2},
}


def tiny_job(model_dir: Path, dask_address: str, **fields) -> dict:
    return {"job": "oneshot", "name": "stack-tiny", "model": str(model_dir), "method": "wanda", "sparsity": 0.5,
            "device": "cpu", **SMALL, "runner": {"kind": "dask", "address": dask_address},
            "tracking": {"experiment": "stack-tests"}, **fields}


def test_script_is_idempotent_and_reports_the_stack(stack):
    pids = {s: stack.pid(s) for s in ("prefect-server", "mlflow", "dask-scheduler", "dask-worker-1")}
    again = stack.script("start")
    assert again.returncode == 0, again.stderr
    assert {s: stack.pid(s) for s in pids} == pids  # nothing restarted
    status = stack.script("status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("running") == 7
    exports = dict(line.removeprefix("export ").split("=", 1) for line in stack.script("env").stdout.splitlines())
    assert exports == {"PREFECT_API_URL": stack.prefect_api, "MLFLOW_TRACKING_URI": stack.mlflow_uri,
                       "DASK_SCHEDULER_ADDRESS": stack.dask_address}
    assert oct((stack.state / "pgpass").stat().st_mode & 0o777) == "0o600"
    print(f"stack startup: {stack.startup_seconds:.1f} s")


@pytest.fixture(scope="module")
def deployed(stack) -> dict:
    """The README's deployment commands, as written (work pools, then ``prefect deploy --all``),
    against the stack's server; the docker and kubernetes pools get no worker (registration only)."""
    env = stack.client_env()
    commands = setup_commands()
    assert any("--all" in argv for argv in commands) and sum(argv[1:3] == ["work-pool", "create"]
                                                           for argv in commands) == 3
    for argv in commands:
        assert argv[0] == "prefect", argv
        proc = subprocess.run([sys.executable, "-m", *argv], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, (argv, proc.stdout[-3000:] + proc.stderr[-3000:])
    return yaml.safe_load(PREFECT_FILE.read_text())


def _flow_name(entrypoint: str) -> str:
    return {"flows/oneshot/flow.py:oneshot_flow": "oneshot-prune", "flows/lottery/flow.py:lottery_flow": "lottery",
            "flows/minitron/flow.py:minitron_flow": "minitron"}[entrypoint]


def test_deploy_registers_every_deployment(stack_prefect, deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for spec in deployed["deployments"]:
            dep = client.read_deployment_by_name(f"{_flow_name(spec['entrypoint'])}/{spec['name']}")
            assert dep.work_pool_name == spec["work_pool"]["name"]
            assert dep.parameters == spec["parameters"]
            assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
            assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
            if spec["work_pool"]["name"] == "pruning-docker":
                assert dep.job_variables["container_create_kwargs"]["shm_size"]
            if spec["work_pool"]["name"] == "pruning-k8s":
                assert dep.job_variables["env"]["PRUNING_RUNS_DIR"] == "/data/runs"
                assert dep.job_variables["runs_pvc"] == "pruning-runs"
        nightly = client.read_deployment_by_name("oneshot-prune/wanda-50-nightly")
        assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
        # resolved by the worker when a run starts, not the deploying shell's $PWD baked in
        assert nightly.pull_steps == [{"flows.deploy_steps.set_working_directory": {}}]
        k8s = client.read_work_pool("pruning-k8s").base_job_template  # the README's --base-job-template
        pod = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        assert {"name": "pruning-data", "persistentVolumeClaim": {"claimName": "{{ runs_pvc }}"}} in pod["volumes"]
        assert k8s["variables"]["properties"]["runs_pvc"]["default"] == "pruning-runs"


def test_deployment_run_scores_on_dask_workers_and_logs_to_mlflow(stack_prefect, deployed, tiny_model_dir_session,
                                                                   tmp_path):
    from distributed import Client
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.deployments import run_deployment

    stack = stack_prefect
    with Client(stack.dask_address, timeout=30) as dask:
        dask.get_task_stream()  # installs the scheduler's task-stream plugin before the run
        workers = set(dask.scheduler_info(n_workers=-1)["workers"])
        job = tiny_job(tiny_model_dir_session, stack.dask_address)
        # as the schedule runs it: no output_dir, so the flow run gets a directory of its own
        flow_run = run_deployment("oneshot-prune/wanda-50-nightly", parameters={"job": job}, timeout=300)
        stream = dask.get_task_stream()
    assert flow_run.state.is_completed(), flow_run.state
    from flows.jobs import parse_config

    parsed = parse_config(job)
    (out,) = (stack.state / "runs" / f"{parsed.name}-{parsed.job_hash()}").iterdir()  # $PRUNING_RUNS_DIR
    assert out.name.endswith(str(flow_run.id))
    summary = json.loads((out / "summary.json").read_text())
    layers = [r["name"] for r in summary["layers"]]
    assert len(layers) == 14 and summary["sparsity"] == pytest.approx(0.5)

    # 1. Dask: one prune_layer task per layer, each run by one of the stack's two workers (both used)
    scoring = [t for t in stream if str(t["key"]).startswith("prune_layer-")]
    assert len(scoring) == len(layers)
    assert {t["worker"] for t in scoring} == workers and len(workers) == 2
    # 2. Prefect: the per-layer task runs of the scoring subflow all completed
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
        sub_ids = [f.id for f in subflows]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sub_ids)),
                                          task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="prune-model.layers.")))
    assert len(task_runs) == len(layers) and all(t.state.is_completed() for t in task_runs)
    # 3. MLflow over HTTP: the run, its metrics, its artifacts (downloaded back and compared)
    client = MlflowClient(stack.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perplexity_after"] == pytest.approx(summary["perplexity_after"])
    assert run.data.metrics["sparsity"] == pytest.approx(0.5)
    assert run.data.params["runner.kind"] == "dask"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "masks.safetensors", "model", "tables", "figures"} <= files
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server into its artifact dir
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["mlflow_run_id"] == run.info.run_id
    stored = list((stack.state / "mlartifacts").rglob("masks.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == (out / "masks.safetensors").read_bytes()


# -- last: stopping -------------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stop_leaves_no_process_alive_and_no_port_open(stack):
    """Runs last (it stops the session's stack; the fixture's `clean` then only deletes the state)."""
    pids = {p.stem: int(p.read_text()) for p in (stack.state / "pids").glob("*.pid")}
    assert set(pids) == {"postgres", "prefect-server", "mlflow", "dask-scheduler", "dask-worker-1",
                         "dask-worker-2", "prefect-worker"}
    procs = [p for pid in pids.values() for p in _tree(pid)]  # services, their workers and flow-run processes
    # every process that carries this stack's state directory in its environment (all launched services)
    for proc in psutil.process_iter():
        try:
            if f"STACK_DIR={stack.state}".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes():
                procs.append(proc)
        except (OSError, psutil.Error):
            continue
    ports = {int(stack.env[k]) for k in ("STACK_PG_PORT", "STACK_PREFECT_PORT", "STACK_MLFLOW_PORT",
                                          "STACK_DASK_PORT")}
    for proc in procs:  # dashboards, nannies, the worker's listeners on ports chosen at start
        try:
            ports |= {c.laddr.port for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert all(_port_open(p) for p in ports & {int(stack.env["STACK_PREFECT_PORT"]), int(stack.env["STACK_PG_PORT"])})
    stopped = stack.script("stop")
    assert stopped.returncode == 0, stopped.stderr
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]
    assert sorted(p for p in ports if _port_open(p)) == []
    assert list((stack.state / "pids").glob("*.pid")) == []
    status = stack.script("status")
    assert status.returncode == 3 and status.stdout.count("stopped") == 7
    assert os.path.isdir(stack.state)  # stop keeps the data (clean deletes it)
