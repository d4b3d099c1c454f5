"""Malformed configs, model directories and text files thrown at ``prune validate`` and ``prune run``
(in process, through the CLI's ``execute``): each one succeeds or fails with a
``pruning_core.errors`` type whose message names the object, never a bare KeyError, OSError,
UnicodeDecodeError, ValidationError or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from flows.cli import _parser, execute
from pruning_core.errors import (
    ArtifactError,
    ConfigError,
    PruningError,
    ServiceUnavailable,
    UnsupportedArchitecture,
)

pytestmark = pytest.mark.flows
SMALL = {"calibration": {"num_windows": 4, "window_length": 32, "batch_size": 4},
         "evaluation": {"num_windows": 2, "window_length": 32, "batch_size": 2}, "device": "cpu"}


def base(model: Path, **fields) -> dict:
    return {"job": "oneshot", "model": str(model), "method": "magnitude", "sparsity": 0.5, **SMALL, **fields}


def section(model: Path, name: str, **fields) -> dict:
    data = base(model)
    data[name] = {**data[name], **fields}
    return data


def fake_model(root: Path, config: object, *, weights: bool | bytes = True) -> Path:
    """A directory with ``config.json`` (a dict, or raw text) and a small valid (or given) safetensors file."""
    root.mkdir()
    (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is True:
        save_file({"w": torch.zeros(2, 2)}, str(root / "model.safetensors"))
    elif weights:
        (root / "model.safetensors").write_bytes(weights)
    return root


# (id, config: dict | bytes | callable(tmp, model) -> path, error type or None, text the message contains)
CONFIGS = [
    ("empty-file", b"", ConfigError, "method"),
    ("only-comments", b"# nothing\n", ConfigError, "method"),
    ("top-level-list", b"- 1\n- 2\n", ConfigError, "expected a mapping, got list"),
    ("top-level-scalar", b"42\n", ConfigError, "got int"),
    ("yaml-syntax", b"method: [wanda\n", ConfigError, "not valid YAML"),
    ("latin-1", "method: caf\xe9\n".encode("latin-1"), ConfigError, "not UTF-8 text"),
    ("utf-16", "method: wanda\n".encode("utf-16"), ConfigError, "not UTF-8 text"),
    ("binary", bytes(range(256)), ConfigError, "not UTF-8 text"),
    ("nul-bytes", b"method: wanda\x00\n", ConfigError, "c.yaml"),
    ("unknown-key", lambda m: base(m, colour="red"), ConfigError, "colour"),
    ("unknown-job", lambda m: base(m, job="distill"), ConfigError, "distill"),
    ("job-is-a-list", lambda m: base(m, job=[1]), ConfigError, "[1]"),
    ("unknown-method", lambda m: base(m, method="obs"), ConfigError, "method"),
    ("sparsity-1", lambda m: base(m, sparsity=1.0), ConfigError, "sparsity"),
    ("sparsity-negative", lambda m: base(m, sparsity=-0.1), ConfigError, "sparsity"),
    ("sparsity-text", lambda m: base(m, sparsity="half"), ConfigError, "half"),
    ("sparsity-nan", lambda m: base(m, sparsity=float("nan")), ConfigError, "sparsity"),
    ("sparsity-list", lambda m: base(m, sparsity=[0.5]), ConfigError, "sparsity"),
    ("pattern-0:4", lambda m: base(m, pattern="0:4", sparsity=None), ConfigError, "0:4"),
    ("pattern-4:4", lambda m: base(m, pattern="4:4", sparsity=None), ConfigError, "4:4"),
    ("pattern-5:4", lambda m: base(m, pattern="5:4", sparsity=None), ConfigError, "5:4"),
    ("pattern-2:0", lambda m: base(m, pattern="2:0", sparsity=None), ConfigError, "2:0"),
    ("pattern-garbage", lambda m: base(m, pattern="diagonal"), ConfigError, "diagonal"),
    ("pattern-int", lambda m: base(m, pattern=24), ConfigError, "pattern"),
    ("nm-with-other-sparsity", lambda m: base(m, pattern="2:4", sparsity=0.3), ConfigError, "0.3"),
    ("scope-unknown", lambda m: base(m, scope="diagonal"), ConfigError, "scope"),
    ("scope-global-sequential", lambda m: section(m, "calibration", mode="sequential") | {"scope": "global"}, ConfigError, "global"),
    ("sparsegpt-row-scope", lambda m: base(m, method="sparsegpt", scope="row"), ConfigError, "scope"),
    ("export-2:4-only", lambda m: base(m, export={"sparse_format": "semi_structured"}), ConfigError, "2:4"),
    ("export-unknown", lambda m: base(m, export={"sparse_format": "zip"}), ConfigError, "zip"),
    ("calibration-not-mapping", lambda m: base(m, calibration=5), ConfigError, "calibration"),
    ("num-windows-0", lambda m: section(m, "calibration", num_windows=0), ConfigError, "num_windows"),
    ("window-negative", lambda m: section(m, "calibration", window_length=-5), ConfigError, "window_length"),
    ("window-too-long", lambda m: section(m, "calibration", window_length=4096), ConfigError,
     "calibration.window_length"),
    ("eval-window-too-long", lambda m: section(m, "evaluation", window_length=300), ConfigError,
     "evaluation.window_length"),
    ("calibration-mode", lambda m: section(m, "calibration", mode="twice"), ConfigError, "mode"),
    ("text-missing", lambda m: section(m, "calibration", text="/nonexistent/t.txt"), ConfigError,
     "/nonexistent/t.txt does not exist"),
    ("text-suffix", lambda m: section(m, "calibration", text="corpus.csv"), ConfigError, "corpus.csv"),
    ("text-unknown-shipped", lambda m: section(m, "evaluation", text="hamlet"), ConfigError, "hamlet"),
    ("text-a-number", lambda m: section(m, "evaluation", text=7), ConfigError, "evaluation.text"),
    ("name-path", lambda m: base(m, name="../escape"), ConfigError, "name"),
    ("name-empty", lambda m: base(m, name=""), ConfigError, "name"),
    ("name-hidden", lambda m: base(m, name=".hidden"), ConfigError, "name"),
    ("device-tpu", lambda m: base(m, device="tpu"), ConfigError, "tpu"),
    ("runner-dask-no-address", lambda m: base(m, runner={"kind": "dask"}), ConfigError, "address"),
    ("runner-threads-address", lambda m: base(m, runner={"address": "tcp://x:1"}), ConfigError, "address"),
    ("runner-workers-0", lambda m: base(m, runner={"max_workers": 0}), ConfigError, "max_workers"),
    ("runner-kind", lambda m: base(m, runner={"kind": "ray"}), ConfigError, "ray"),
    ("tracking-list", lambda m: base(m, tracking=[]), ConfigError, "tracking"),
    ("tracking-tag-list", lambda m: base(m, tracking={"tags": {"a": [1]}}), ConfigError, "tracking.tags"),
    ("too-large", lambda m: base(m, tracking={"tags": {f"t{i}": "x" * 1000 for i in range(600)}}), ConfigError,
     "524,288"),
    ("sparsegpt-percdamp", lambda m: base(m, method="sparsegpt", sparsegpt={"percdamp": 0}), ConfigError,
     "percdamp"),
    ("minitron-bad-field", lambda m: {"job": "minitron", "model": str(m), "layers": "many"}, ConfigError, "c.yaml"),
    ("lottery-bad-model", lambda m: {"job": "lottery", "model": "resnet"}, ConfigError, "resnet"),
    ("valid-magnitude", lambda m: base(m), None, ""),
    ("valid-2:4-wanda", lambda m: base(m, method="wanda", pattern="2:4", sparsity=None), None, ""),
    ("valid-shipped-texts", lambda m: section(m, "calibration", text="pride_and_prejudice"), None, ""),
]

# (id, model directory builder(tmp) -> path, error type, text the message contains)
MODELS = [
    ("missing", lambda t: t / "nope", ConfigError, "nope does not exist"),
    ("a-file", lambda t: (t / "weights.bin").write_bytes(b"x") and t / "weights.bin", ConfigError, "is a file"),
    ("empty-dir", lambda t: (t / "m").mkdir() or t / "m", ArtifactError, "no config.json"),
    ("config-not-json", lambda t: fake_model(t / "m", "{model_type: llama"), ArtifactError, "config.json"),
    ("config-binary", lambda t: fake_model(t / "m", "\x00\x01"), ArtifactError, "config.json"),
    ("no-safetensors", lambda t: fake_model(t / "m", {"model_type": "llama"}, weights=False), ArtifactError,
     "no *.safetensors"),
    ("corrupt-safetensors", lambda t: fake_model(t / "m", {"model_type": "llama"}, weights=b"\x08" + b"\x00" * 20),
     ArtifactError, "model.safetensors"),
    ("truncated-safetensors", lambda t: fake_model(t / "m", {"model_type": "llama"}, weights=b"\x01\x02"),
     ArtifactError, "model.safetensors"),
    ("unknown-model-type", lambda t: fake_model(t / "m", {"model_type": "no_such_model"}), UnsupportedArchitecture,
     "no_such_model"),
    ("bert-masked-lm", lambda t: fake_model(t / "m", {"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
     UnsupportedArchitecture, "BertForMaskedLM"),
    ("t5-encoder-decoder", lambda t: fake_model(t / "m", {"model_type": "t5", "architectures":
                                                          ["T5ForConditionalGeneration"]}),
     UnsupportedArchitecture, "encoder-decoder"),
    ("llama-classifier", lambda t: fake_model(t / "m", {"model_type": "llama", "architectures":
                                                        ["LlamaForSequenceClassification"]}),
     UnsupportedArchitecture, "LlamaForSequenceClassification"),
]


def cli(*argv) -> object:
    return execute(_parser().parse_args([str(a) for a in argv]))


def check(call, error: type[PruningError] | None, text: str) -> None:
    if error is None:
        call()
        return
    with pytest.raises(PruningError) as info:
        call()
    assert type(info.value) is error or isinstance(info.value, error), repr(info.value)
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize(("case", "config", "error", "text"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_malformed_config(tmp_path, tiny_model_dir_session, case, config, error, text):
    path = tmp_path / "c.yaml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(yaml.safe_dump(config(tiny_model_dir_session)))
    check(lambda: cli("validate", path), error, text)


@pytest.mark.parametrize(("case", "model", "error", "text"), MODELS, ids=[c[0] for c in MODELS])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_malformed_model_directory(tmp_path, case, model, error, text, command):
    """``run`` fails on these before its flow starts (no Prefect server, no MLflow run)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(model(tmp_path))))
    extra = ("--output-dir", tmp_path / "out") if command == "run" else ()
    check(lambda: cli(command, path, *extra), error, text)
    assert not (tmp_path / "out").exists()


def _output_dirs(tmp: Path, model: Path) -> dict[str, Path]:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("x")
    (tmp / "junk").mkdir()
    (tmp / "junk" / "config.json").write_text("not json")
    (tmp / "a-file").write_text("x")
    return {"file": tmp / "a-file", "model": model, "notes": tmp / "notes", "junk-config": tmp / "junk"}


@pytest.mark.parametrize(("where", "text"), [("file", "is a file"), ("model", "is a model directory"),
                                             ("notes", "no run wrote"), ("junk-config", "no run wrote")])
def test_output_directory_that_is_not_a_run_directory(tmp_path, tiny_model_dir_session, where, text):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(tiny_model_dir_session)))
    out = _output_dirs(tmp_path, tiny_model_dir_session)[where]
    check(lambda: cli("run", path, "--output-dir", out), ConfigError, f"{out} ")


@pytest.mark.parametrize(("case", "argv", "error", "text"), [
    ("missing-config", ("validate", "/nonexistent.yaml"), ConfigError, "/nonexistent.yaml does not exist"),
    ("config-is-dir", ("validate", "/tmp"), ConfigError, "/tmp is a directory"),
    ("run-missing-config", ("run", "/nonexistent.yaml"), ConfigError, "/nonexistent.yaml does not exist"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_paths(case, argv, error, text):
    check(lambda: cli(*argv), error, text)


def test_unreachable_scheduler_is_a_service_error(tmp_path, tiny_model_dir_session):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(tiny_model_dir_session, runner={"kind": "dask",
                                                                        "address": "tcp://127.0.0.1:9"})))
    check(lambda: cli("run", path, "--output-dir", tmp_path / "out"), ServiceUnavailable, "tcp://127.0.0.1:9")


# -- text files that only the flow's first task reads -----------------------------------------------
TEXTS = [
    ("empty", b"", "t.txt"),
    ("not-utf8", "caf\xe9 ".encode("latin-1") * 50, "t.txt"),
    ("too-short", b"Only a few words.", "t.txt"),
    ("jsonl-no-field", b'{"body": "x"}\n', "t.jsonl"),
    ("jsonl-garbage", b"{not json\n", "t.jsonl"),
    ("gzip-not-gzip", b"plain text", "t.txt.gz"),
]


@pytest.mark.parametrize(("case", "content", "name"), TEXTS, ids=[t[0] for t in TEXTS])
def test_malformed_text_file(prefect_server, mlflow_uri, tmp_path, tiny_model_dir_session, case, content, name):
    text = tmp_path / name
    text.write_bytes(content)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(section(tiny_model_dir_session, "calibration", text=str(text))))
    check(lambda: cli("run", path, "--output-dir", tmp_path / "out"), PruningError, str(text))
