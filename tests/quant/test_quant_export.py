"""End to end on a tiny Llama: calibrate, GPTQ every Linear, save pack-quantized, reload, same outputs.

Reloads go through the consumer libraries, never through our own reader: compressed-tensors'
compressor decompresses each layer of the saved files into a fresh model (every version), and
``transformers.AutoModelForCausalLM.from_pretrained`` loads the directory as a user would (needs
compressed-tensors >= 0.15, which transformers 5 requires; skipped with the reason otherwise).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pruning_core.calibration import collect_activation_stats
from pruning_core.errors import ConfigError, ShapeMismatch, UnsupportedOperation
from pruning_core.lm.text import calibration_windows, load_text, tokenize_corpus
from pruning_core.masks.pattern import NM
from pruning_core.quant import QuantSpec, quantization_args, quantize_rtn, save_quantized
from pruning_core.solvers import gptq_quantize

ct = pytest.importorskip("compressed_tensors")
CT_VERSION = tuple(int(p) for p in ct.__version__.split(".")[:2])


def _windows(tokenizer) -> torch.Tensor:
    tokens = tokenize_corpus(tokenizer, load_text("emma")[:20_000])
    return calibration_windows(tokens, 8, 32, seed=0)


def _quantize(model, tokenizer, spec, **solver):
    """GPTQ (or joint) on every Linear but the head, in one calibration pass; the model's weights
    become the dequantized ones (the in-memory quantized model). Returns {name: QuantizedWeight}."""
    windows = _windows(tokenizer)
    ctx = collect_activation_stats(model, [windows[:4], windows[4:]], hessian=True, progress=False)
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            hessian = ctx.require_stats(name).hessian
            qw, _ = gptq_quantize(module.weight, hessian, spec, blocksize=32, name=name, **solver)
            module.weight.data = qw.dequantize(module.weight.dtype)
            quantized[name] = qw
    return quantized, windows


def _library_reload(path, spec) -> nn.Module:
    """A fresh model from ``config.json`` whose quantized layers compressed-tensors decompresses."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    section = cfg.pop("quantization_config")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
    compressor = BaseCompressor.get_value_from_registry(section["format"])
    for name in modules:
        local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if hasattr(compressor, "decompress_weight"):  # 0.13
            dense = compressor(config=None).decompress_weight(local, quantization_args=quantization_args(spec))
        else:  # >= 0.15
            scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(spec))
            dense = compressor.decompress(local, scheme)["weight"]
        tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] != name}
        tensors[f"{name}.weight"] = dense
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    model.tie_weights()
    return model


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


SPECS = [QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=32, symmetric=False),
         QuantSpec(bits=8, group_size=-1), QuantSpec(bits=8, group_size=-1, symmetric=False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_export_reloads_to_the_same_outputs(tmp_path, tiny_lm, spec):
    model, tokenizer = tiny_lm
    dense = _logits(model, _windows(tokenizer))
    quantized, windows = _quantize(model, tokenizer, spec)
    ours = _logits(model, windows)
    assert not torch.equal(ours, dense)  # the weights really changed
    out = save_quantized(model, quantized, tmp_path / "w", tokenizer=tokenizer)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    reloaded = _library_reload(out, spec)
    for name, qw in quantized.items():
        assert torch.equal(reloaded.get_submodule(name).weight, qw.dequantize(torch.float32))
    torch.testing.assert_close(_logits(reloaded, windows), ours, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_transformers_from_pretrained(tmp_path, tiny_lm, spec):
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_compressed_tensors_available

    if not is_compressed_tensors_available():
        pytest.skip(f"transformers needs compressed-tensors >= 0.15 to load the format; {ct.__version__} installed")
    if not spec.symmetric and CT_VERSION >= (0, 18):
        pytest.skip(f"compressed-tensors {ct.__version__} allocates unpacked zero points and rejects packed ones")
    model, tokenizer = tiny_lm
    quantized, windows = _quantize(model, tokenizer, spec)
    out = save_quantized(model, quantized, tmp_path / "w", tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, windows), _logits(model, windows), rtol=0, atol=0)


def test_joint_2_4_bfloat16_export_keeps_the_zeros(tmp_path, tiny_lm):
    # 2:4 pruning and 4-bit quantization in one pass, bf16 model and scales: the reloaded bf16
    # weights are bit-identical to the in-memory ones and every group of 4 keeps at most 2.
    model, tokenizer = tiny_lm
    model = model.to(torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=32)
    quantized, _ = _quantize(model, tokenizer, spec, sparsity=0.5, pattern=NM(2, 4))
    out = save_quantized(model, quantized, tmp_path / "w")
    reloaded = _library_reload(out, spec)
    for name in quantized:
        weight = reloaded.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, model.get_submodule(name).weight)
        assert bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def test_bad_requests(tmp_path, tiny_lm):
    model, _ = tiny_lm
    w = model.model.layers[0].mlp.up_proj.weight
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=32))
    with pytest.raises(UnsupportedOperation, match="model.norm"):
        save_quantized(model, {"model.norm": qw}, tmp_path / "a")
    with pytest.raises(ShapeMismatch):
        save_quantized(model, {"model.layers.0.mlp.down_proj": qw}, tmp_path / "b")
    other = quantize_rtn(w, QuantSpec(bits=8, group_size=-1))
    with pytest.raises(ConfigError, match="one spec"):
        save_quantized(model, {"model.layers.0.mlp.up_proj": qw, "model.layers.1.mlp.up_proj": other}, tmp_path / "c")
    with pytest.raises(ConfigError):
        save_quantized(model, {}, tmp_path / "d")
    assert not any(tmp_path.iterdir())  # nothing half-written
