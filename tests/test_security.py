"""Security rules of the project, checked on the source tree: nothing unpickles files, torch files
load with ``weights_only=True``, servers we start bind to localhost, shipped configs carry no secrets,
job names (which become directory names) cannot leave the runs directory. (Artifact names that would
leave their directory: tests/io/test_io_manifest_paths.py and test_io_atomic.py; compose
credentials: tests/stack/test_docker.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flows.jobs import load_config, parse_config
from flows.rundir import default_output_dir
from pruning_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("pruning_core", "flows", "scripts") for p in (REPO / d).rglob("*.py"))


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            calls.append((ast.unparse(node.func), node))
    return calls


def test_the_scan_sees_the_code():
    assert len(CODE) > 40 and any(p.as_posix().endswith("flows/minitron/tasks.py") for p in CODE)


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unpickling_and_torch_load_is_weights_only(path):
    for name, call in _calls(path):
        assert name not in {"pickle.load", "pickle.loads", "dill.load", "cloudpickle.load", "joblib.load",
                            "numpy.load", "np.load"} or any(
            k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in call.keywords), (path, name)
        if name == "torch.load":
            assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords), path
    assert "import pickle" not in path.read_text(), path


def test_servers_started_by_the_stack_bind_localhost():
    script = (REPO / "scripts" / "stack.sh").read_text()
    hosts = re.findall(r"--host[ =](\S+)", script) + re.findall(r"listen_addresses=(\S+)", script)
    assert hosts and set(hosts) == {"127.0.0.1"}
    assert "0.0.0.0" not in script


SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|access_key)\s*[:=]\s*\S", re.IGNORECASE)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + [REPO / "deployments" / "prefect.yaml"],
                         ids=lambda p: p.name)
def test_shipped_configs_hold_no_secrets(path):
    assert not SECRET_KEY.search(path.read_text()), path


def test_images_hold_no_secrets():
    for dockerfile in (REPO / "docker").glob("*Dockerfile*"):
        text = dockerfile.read_text()
        assert not SECRET_KEY.search(text), dockerfile
        assert not re.search(r"^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", text, re.MULTILINE | re.IGNORECASE), dockerfile


# -- job names become directory names: runs/<name>-<hash> ------------------------------------------
JOBS = {"oneshot": {"method": "wanda", "sparsity": 0.5}, "lottery": {"job": "lottery"},
        "minitron": {"job": "minitron", "target": {"param_fraction": 0.8}}}
BAD_NAMES = ["../../tmp/x", "/etc/x", "..", ".", ".hidden", "a/b", "a\\b", "", "x" * 101, "a b", "-rf", "nul\x00l", "ok\n",
             "é"]


@pytest.mark.parametrize("kind", sorted(JOBS))
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_job_names_that_could_escape_the_runs_directory_are_refused(kind, name):
    with pytest.raises(ConfigError, match=r"name: must be 1-100 characters from A-Z a-z 0-9 \. _ -") as err:
        parse_config({**JOBS[kind], "name": name})
    assert err.value.field == "name"


@pytest.mark.parametrize("kind", sorted(JOBS))
@pytest.mark.parametrize("name", ["wanda-50", "A.b_c-1", "x" * 100, "7"])
def test_job_names_that_stay_one_path_component_are_accepted(kind, name, tmp_path):
    job = parse_config({**JOBS[kind], "name": name})
    out = (tmp_path / default_output_dir(job)).resolve()
    assert job.name == name and out.parent == (tmp_path / "runs").resolve()


def test_a_config_file_stem_used_as_name_is_validated_too(tmp_path):
    good, bad = tmp_path / "wanda-50.yaml", tmp_path / "my job.yaml"
    for path in (good, bad):
        path.write_text("method: wanda\nsparsity: 0.5\n")
    assert load_config(good).name == "wanda-50"
    with pytest.raises(ConfigError, match="name: must be"):
        load_config(bad)
