"""Issue 14 through the ``prune`` CLI: typed errors naming the object, checks before long work,
no orphaned Prefect server after SIGKILL, one run per output directory at a time, finished runs
stay FINISHED, byte-reproducible masks, full and read-only disks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import _parser, execute, main
from pruning_core.errors import ArtifactError, ConfigError, ServiceUnavailable, UnsupportedArchitecture
from pruning_core.io import paths
from pruning_core.io.manifest import Manifest
from tests.flows.test_fault_tolerance import HELPER, N_LAYERS, child_env, free_port, job_dict, layer_entries

pytestmark = pytest.mark.flows
ROOT = os.geteuid() == 0


def cli(*argv: str):
    """A ``prune`` command in this process; raises what it fails with."""
    return execute(_parser().parse_args([str(a) for a in argv]))


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def mount(tmp_path):
    """``mount(dir, *options)``: a tmpfs (size-limited) or read-only bind mount, unmounted afterwards."""
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs / read-only bind mount")
    mounted = []

    def do(target: Path, *args: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        for cmd in args:
            if subprocess.run(["sh", "-c", cmd.replace("DIR", str(target))], check=False).returncode:
                pytest.skip(f"cannot {cmd}")
        mounted.append(target)
        return target

    yield do
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


# -- silently wrong, reached through the CLI --------------------------------------------------------
COMMANDS = pytest.mark.parametrize("command", [("validate",), ("run", "--output-dir", "out")], ids=["validate", "run"])


def cmd(command: tuple[str, ...], config: Path):
    """``prune validate CONFIG`` or ``prune run CONFIG --output-dir DIR`` (DIR beside the config)."""
    return cli(command[0], config, *[config.parent / a if a == "out" else a for a in command[1:]])


@COMMANDS
def test_zero_of_m_pattern_is_refused(tmp_path, tiny_model_dir_session, command):
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session, pattern="0:4", sparsity=None))
    with pytest.raises(ConfigError, match=r"pattern.*0:4"):
        cmd(command, config)
    assert not (tmp_path / "out").exists()


@COMMANDS
def test_non_causal_model_is_refused(tmp_path, command):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    config = write_config(tmp_path / "c.yaml", job_dict(bert))
    with pytest.raises(UnsupportedArchitecture, match="BertForMaskedLM"):
        cmd(command, config)
    assert not (tmp_path / "out").exists()


@COMMANDS
def test_window_beyond_the_models_positions_is_refused(tmp_path, tiny_model_dir_session, command):
    data = job_dict(tiny_model_dir_session)
    data["calibration"] = {**data["calibration"], "window_length": 300}
    with pytest.raises(ConfigError, match=r"calibration.window_length.*300.*max_position_embeddings = 256"):
        cmd(command, write_config(tmp_path / "c.yaml", data))
    assert not (tmp_path / "out").exists()


def test_a_text_path_that_is_a_directory_in_the_library(tmp_path):
    from pruning_core.lm import load_text

    (tmp_path / "corpus.txt").mkdir()
    with pytest.raises(ArtifactError, match="corpus.txt.*is a directory, not a text file"):
        load_text(tmp_path / "corpus.txt")


# -- raw tracebacks that became typed errors --------------------------------------------------------
def test_config_that_is_not_utf8(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("name: caf\xe9\nmethod: wanda\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9"):
        cli("validate", config)


def test_config_over_prefects_parameter_limit_is_refused_at_validate(tmp_path, tiny_model_dir_session):
    data = job_dict(tiny_model_dir_session, tracking={"tags": {f"k{i}": "v" * 1000 for i in range(600)}})
    with pytest.raises(ConfigError, match=r"tracking.*524,288 bytes") as info:
        cli("validate", write_config(tmp_path / "big.yaml", data))
    assert info.value.field == "tracking"


def test_validate_a_directory_and_a_text_path_that_is_a_directory(tmp_path, tiny_model_dir_session):
    with pytest.raises(ConfigError, match=f"{tmp_path} is a directory, not a YAML config file"):
        cli("validate", tmp_path)
    data = job_dict(tiny_model_dir_session)
    (tmp_path / "texts.txt").mkdir()
    data["calibration"] = {**data["calibration"], "text": str(tmp_path / "texts.txt")}
    with pytest.raises(ConfigError, match=r"calibration.text.*texts.txt is a directory, not a text file"):
        cli("validate", write_config(tmp_path / "c.yaml", data))


def test_unreachable_dask_scheduler_fails_before_any_work(tmp_path, tiny_model_dir_session):
    address = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session, runner={"kind": "dask",
                                                                                        "address": address}))
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=f"Dask scheduler at {address} is unavailable"):
        cli("run", config, "--output-dir", tmp_path / "run")
    assert time.monotonic() - start < 10 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["file", "model", "other"])
def test_output_dir_that_cannot_be_a_run_directory(tmp_path, tiny_model_dir_session, kind):
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    out = {"file": tmp_path / "c.yaml", "model": tiny_model_dir_session, "other": tmp_path}[kind]
    message = {"file": "is a file, not a directory", "model": "is a model directory",
               "other": "is a directory no run wrote"}[kind]
    with pytest.raises(ConfigError, match=f"{out} {message}") as info:
        cli("run", config, "--output-dir", out)
    assert info.value.field == "output_dir"


def test_read_only_output_directory(tmp_path, tiny_model_dir_session, mount):
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    ro = mount(tmp_path / "ro", "mount --bind DIR DIR && mount -o remount,ro,bind DIR")
    with pytest.raises(ArtifactError, match=r"ro/run.*Read-only file system"):
        cli("run", config, "--output-dir", ro / "run")


def test_truncated_job_record(prefect_server, mlflow_uri, tmp_path, tiny_model_dir_session):
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    paths.job_record(run_dir).write_text('{"job_hash": "0123')
    with pytest.raises(ArtifactError, match=r"job.json.*truncated or not JSON"):
        cli("run", config, "--output-dir", run_dir)


def test_full_disk_names_the_path_and_the_run_resumes(prefect_server, mlflow_uri, tmp_path, tiny_model_dir_session,
                                                       mount, capsys):
    """A real full disk: the output directory is a 300 KiB tmpfs (the windows fit, the model does not)."""
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    disk = mount(tmp_path / "disk", "mount -t tmpfs -o size=300k tmpfs DIR")
    assert main(["run", str(config), "--output-dir", str(disk / "run")]) == 2
    error = capsys.readouterr().err
    assert "No space left on device (errno 28)" in error and str(disk / "run") in error
    assert "Traceback" not in error
    done = layer_entries(disk / "run")
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    summary = cli("run", config, "--output-dir", disk / "run")
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01) and done <= layer_entries(disk / "run")


# -- operations -------------------------------------------------------------------------------------
def _session_processes(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_sigkill_leaves_no_prefect_server_behind(tmp_path, tiny_model_dir_session):
    """A real ``prune run`` with its own temporary Prefect server, SIGKILLed (the CLI process only)."""
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    env = {k: v for k, v in child_env(PRUNING_TEST_LAYER_DELAY="0.5").items() if k != "PREFECT_API_URL"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HELPER), "run", str(config), "--output-dir", str(tmp_path / "run")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not layer_entries(tmp_path / "run") and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    assert len(_session_processes(proc.pid)) >= 2  # the CLI and its server (uvicorn)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_processes(proc.pid)
    for pid in left:  # never leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_two_identical_runs_into_one_directory_do_the_work_once(prefect_server, tmp_path, tiny_model_dir_session):
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    markers = tmp_path / "markers"
    markers.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env(PRUNING_TEST_LAYER_DELAY="0.1", PRUNING_TEST_MARKERS=str(markers), MLFLOW_TRACKING_URI=uri)
    cmd = [sys.executable, str(HELPER), "run", str(config), "--output-dir", str(tmp_path / "run")]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    time.sleep(1)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    outs = [p.communicate(timeout=400)[0].decode() for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    started = sorted(p.name.split("--")[1] for p in markers.glob("*.start"))
    assert len(started) == N_LAYERS and len(set(started)) == N_LAYERS  # every layer pruned once
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "sparsity")) == 1  # one set of metrics
    assert all(runs[0].info.run_id in out for out in outs)  # both report the one run


def _with_stale_manifest(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``model_dir`` carrying the manifest of another directory (as a pruned output
    modified after it was written would): it vouches for content the directory does not hold."""
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    (other / "model.safetensors").write_bytes(b"other weights")
    manifest = Manifest(other)
    for f in sorted(other.iterdir()):
        manifest.record(f.name, f, kind="model-file")
    copy = tmp_path / "stale"
    shutil.copytree(model_dir, copy)
    shutil.copy(paths.manifest(other), paths.manifest(copy))
    return copy


def test_failed_rerun_keeps_the_finished_run_finished_and_masks_are_reproducible(
        prefect_server, mlflow_uri, tmp_path, tiny_model_dir_session):
    """Also: a model directory's fingerprint comes from its content, not from a stale manifest."""
    config = write_config(tmp_path / "c.yaml", job_dict(tiny_model_dir_session))
    first = cli("run", config, "--output-dir", tmp_path / "a")
    stale = write_config(tmp_path / "s.yaml", job_dict(_with_stale_manifest(tiny_model_dir_session, tmp_path)))
    cli("run", stale, "--output-dir", tmp_path / "b")
    masks = (tmp_path / "a" / "masks.safetensors").read_bytes()
    (tmp_path / "a" / "masks.safetensors").unlink()
    cli("run", config, "--output-dir", tmp_path / "a")  # writes the masks again
    assert (tmp_path / "a" / "masks.safetensors").read_bytes() == masks  # byte-identical: sorted metadata
    prints = [json.loads(paths.inputs(tmp_path / d).read_text())["fingerprint"] for d in "ab"]
    assert prints[0] == prints[1]  # the same weights: the same fingerprint, whatever the manifest says
    manifest = paths.manifest(tmp_path / "a")
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ArtifactError, match=r"manifest.json.*malformed manifest"):
        cli("run", config, "--output-dir", tmp_path / "a")
    run = MlflowClient(mlflow_uri).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["mlflow_run_id"] == first["mlflow_run_id"]


def test_compose_publishes_servers_on_loopback_only():
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker" / "compose.yml").read_text())["services"]
    published = {name: service.get("ports", []) for name, service in compose.items()}
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert all(str(p).startswith("127.0.0.1:") for ports in published.values() for p in ports), published
