"""lm.stream: every block gets the inputs the model itself computes; streaming perplexity and calibration."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from pruning_core.arch import decoder_blocks
from pruning_core.calibration import ActivationStats
from pruning_core.errors import ConfigError
from pruning_core.lm.activations import Activations
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.evaluate import nll_from_logits, perplexity
from pruning_core.lm.stream import LayerStream, calibrate_blocks, streaming_perplexity
from pruning_core.lm.writer import CheckpointWriter
from tests.tiny_models import ARCHITECTURES, make_tiny

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = [(name, dt) for name in ARCHITECTURES for dt in DTYPES]
WINDOWS = torch.randint(3, 384, (5, 32), generator=torch.Generator().manual_seed(0))  # 32 > Gemma's window 16


def _from_pretrained(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _model_inputs(model, windows, batch_size):
    """Per block, per batch: (hidden states, args, kwargs) the model's own forward passes the block."""
    blocks = decoder_blocks(model)[1]
    seen = [[] for _ in blocks]

    def hook(i):
        def pre(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            seen[i].append((hidden.clone(), args[1:], rest))
        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for lo in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[lo : lo + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _assert_same(got, want, where):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, tuple | list):
        assert type(got) is type(want) and len(got) == len(want), where
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{j}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize(("name", "dt"), FAMILIES, ids=[f"{n}-{d}" for n, d in FAMILIES])
def test_every_block_gets_the_models_own_inputs_and_perplexity_is_the_models(tmp_path, name, dt):
    """No pruning: block i's inputs (hidden states, masks, per-layer rotary embeddings, alibi, every
    argument) equal what the full model's forward passes block i; the perplexity is the full model's."""
    dtype = DTYPES[dt]
    make_tiny(name, dtype=dtype, layers=3).save_pretrained(tmp_path)
    reference = _from_pretrained(tmp_path, dtype)
    want = _model_inputs(reference, WINDOWS, 2)
    stream = LayerStream(tmp_path, WINDOWS, batch_size=2, dtype=dtype, progress=False)
    got = [[] for _ in range(stream.num_blocks)]

    def capture(i, block, inputs):
        got[i] = [(hidden.clone(), call.args, call.kwargs) for hidden, call in inputs]

    final = stream.run(capture)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w) == 3
        _assert_same(g, w, f"block {i}")
    total = sum(float(nll_from_logits(logits, tokens).sum()) for _, tokens, logits in stream.logits(final))
    streamed = math.exp(total / (WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)))
    full = perplexity(reference, WINDOWS, batch_size=2, progress=False)
    assert abs(streamed - full) <= 1e-6 * full


def test_gemma_layers_get_different_masks_and_rotary_embeddings(tmp_path):
    """Why block 0's arguments cannot be reused: Gemma 2/3 alternate sliding and full attention."""
    make_tiny("gemma3", layers=3).save_pretrained(tmp_path)
    stream = LayerStream(tmp_path, WINDOWS, batch_size=5, progress=False)
    _, calls = stream.record()
    first, second = calls[0][0].kwargs, calls[1][0].kwargs
    assert not torch.equal(first["position_embeddings"][0], second["position_embeddings"][0])
    assert calls[0][0].kwargs["attention_mask"] is calls[2][0].kwargs["attention_mask"]  # stored once


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gemma3", "falcon_alibi", "gpt2", "opt"])
def test_streaming_perplexity_fp32_on_a_bf16_checkpoint(tmp_path, name):
    make_tiny(name, dtype=torch.bfloat16, layers=3).save_pretrained(tmp_path)
    full = perplexity(_from_pretrained(tmp_path, torch.float32), WINDOWS, batch_size=3, progress=False)
    assert CheckpointReader(tmp_path).stored_dtype == torch.bfloat16
    streamed = streaming_perplexity(tmp_path, WINDOWS, batch_size=3, progress=False)  # float32 on CPU
    spilled = streaming_perplexity(tmp_path, WINDOWS, batch_size=2, spill_dir=tmp_path / "spill", progress=False)
    part = streaming_perplexity(tmp_path, WINDOWS, batch_size=2, spill_dir=tmp_path / "spill",
                                activation_budget=2 * 32 * 64 * 4, progress=False)  # one batch in memory
    for value in (streamed, spilled, part):
        assert abs(value - full) <= 1e-6 * full
    assert list((tmp_path / "spill").iterdir()) == []


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "gpt2"])  # untied head; scaled embeddings; tied, Conv1D
def test_compact_shell_keeps_vocabulary_tables_stored_and_computes_the_same(tmp_path, name):
    make_tiny(name, dtype=torch.bfloat16, layers=2).save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    full = reader.load_shell(dtype=torch.float32)
    shell = reader.load_shell(dtype=torch.float32, compact=True)
    embed, head = shell.get_input_embeddings(), shell.get_output_embeddings()
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16  # 2 bytes per value, not 4
    others = [n for n, p in shell.named_parameters() if not p.is_meta and p is not embed.weight and p is not head.weight]
    assert others and all(dict(shell.named_parameters())[n].dtype == torch.float32 for n in others)
    ids = WINDOWS[:2]
    with torch.no_grad():
        torch.testing.assert_close(embed(ids), full.get_input_embeddings()(ids), rtol=0, atol=0)
        hidden = torch.randn(2, 32, head.weight.shape[1])
        torch.testing.assert_close(head(hidden), full.get_output_embeddings()(hidden), rtol=1e-6, atol=1e-5)
    assert embed.weight.dtype == torch.bfloat16 and embed.weight.shape[0] == full.get_input_embeddings().weight.shape[0]


def test_activations_keep_what_fits_and_spill_the_rest(tmp_path):
    acts = Activations(tmp_path, budget=100)
    tensors = [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 3, 4)]  # 96, 96, 48 bytes
    for t in tensors:
        acts.append(t)
    assert acts.spilled == 2 and len(list(tmp_path.iterdir())) == 2 and acts.nbytes == 240
    assert all(torch.equal(acts[i], t) for i, t in enumerate(tensors))
    acts.release()
    assert list(tmp_path.iterdir()) == [] and len(acts) == 0
    memory = Activations()
    memory.append(tensors[0])
    assert memory.spilled == 0 and memory[0] is not None


def test_bad_windows_fail_before_any_block_is_read(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"token ids must lie in \[0, 383\]"):
        LayerStream(tmp_path, torch.tensor([[1, 384]]))
    with pytest.raises(ConfigError, match="batch_size"):
        LayerStream(tmp_path, WINDOWS, batch_size=0)


# ---------------------------------------------------------------------------------------- calibration
def _linear_stats(block, prefix, stats):
    """Hooks adding every Linear's input into float64 ActivationStats; returns a context manager."""
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            acc = stats.setdefault(prefix + name, ActivationStats(module.in_features, name=prefix + name))
            handles.append(module.register_forward_hook(lambda m, a, o, acc=acc: acc.update(a[0])))
    stack = contextlib.ExitStack()
    stack.callback(lambda: [h.remove() for h in handles])
    return stack


def _magnitude_half(block):
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                idx = w.abs().argsort(dim=1, stable=True)[:, : w.shape[1] // 2]
                w.scatter_(1, idx, 0)
    return {"pruned": True}


def _magnitude_half_record(i, block):
    with torch.no_grad():  # an update like SparseGPT's: float32 values that bf16 cannot hold
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1.0 + 1e-3)
    return _magnitude_half(block)


def _block_inputs(stream_dir, windows):
    """Block inputs of a saved model, from its own full forward."""
    return [[h for h, _, _ in per] for per in _model_inputs(_from_pretrained(stream_dir, torch.float32), windows, 5)]


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one-pass"])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_calibrate_blocks_sees_the_right_inputs_and_writes_the_pruned_model(tmp_path, name, sequential):
    make_tiny(name, dtype=torch.bfloat16, layers=3).save_pretrained(tmp_path / "in")
    stream = LayerStream(tmp_path / "in", WINDOWS, batch_size=5, head=False, progress=False)
    stats, inputs_seen = {}, {}

    def observe(i, block, inputs):
        inputs_seen[i] = [h.clone() for h, _ in inputs]
        return _linear_stats(block, f"{stream.reader.block_prefix}.{i}.", stats)

    with CheckpointWriter(stream.reader, tmp_path / "out") as writer:
        records = calibrate_blocks(stream, _magnitude_half_record, observe=observe, sequential=sequential,
                                   writer=writer)
        writer.finish()
    assert records == {i: {"pruned": True} for i in range(3)}
    # one-pass: the dense model's block inputs; sequential: the written model's (blocks < i pruned and
    # stored in bf16: the stream propagates what it wrote, not its float32 working copy)
    want = _block_inputs(tmp_path / "in", WINDOWS) if not sequential else _block_inputs(tmp_path / "out", WINDOWS)
    for i in range(3):
        torch.testing.assert_close(inputs_seen[i][0], want[i][0], rtol=1e-6, atol=1e-6)
    if not sequential:  # statistics equal a direct computation on the dense model
        dense = _from_pretrained(tmp_path / "in", torch.float32)
        ref: dict = {}
        with _linear_stats(dense, "", ref), torch.no_grad():
            dense(input_ids=WINDOWS, use_cache=False)
        for key, acc in stats.items():
            torch.testing.assert_close(acc.sum_sq, ref[key].sum_sq, rtol=1e-5, atol=1e-8)
            assert acc.count == ref[key].count == WINDOWS.numel()
    pruned = _from_pretrained(tmp_path / "out", torch.bfloat16)
    for i, block in enumerate(decoder_blocks(pruned)[1]):
        expected = stream.reader.load_block(i, dtype=torch.float32)
        _magnitude_half_record(i, expected)  # the same float32 arithmetic, then stored in bf16
        for (n, got), want in zip(block.state_dict().items(), expected.state_dict().values(), strict=True):
            assert torch.equal(got, want.to(torch.bfloat16)), n


def test_sequential_calibration_resumes_after_a_crash(tmp_path):
    make_tiny("qwen3", dtype=torch.bfloat16, layers=4).save_pretrained(tmp_path / "in")

    class Crash(Exception):
        pass

    def run(crash_at=None):
        calls = []

        def finish(i, block):
            if i == crash_at:
                raise Crash
            calls.append(i)
            return {"block": i, **_magnitude_half_record(i, block)}

        stream = LayerStream(tmp_path / "in", WINDOWS, batch_size=5, head=False, progress=False)
        with CheckpointWriter(stream.reader, tmp_path / "out", key="job") as writer:
            records = calibrate_blocks(stream, finish, sequential=True, writer=writer)
            path = writer.finish()
        return calls, records, path

    with pytest.raises(Crash):
        run(crash_at=2)
    calls, records, out = run()
    assert calls == [2, 3] and sorted(records) == [0, 1, 2, 3]
    resumed = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    calls, _, out = run()  # a fresh, uninterrupted run over the same input
    assert calls == [0, 1, 2, 3]
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == resumed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama", "gemma2", "mixtral"])
def test_streaming_on_cuda_keeps_only_the_block_on_the_device(tmp_path, name):
    make_tiny(name, dtype=torch.bfloat16, layers=3).save_pretrained(tmp_path)
    stream = LayerStream(tmp_path, WINDOWS, batch_size=2, device="cuda", progress=False)
    assert stream.dtype == torch.bfloat16  # the stored dtype on an accelerator
    devices = set()

    def check(i, block, inputs):
        devices.add(next(block.parameters()).device.type)
        assert inputs.hidden[0].device.type == "cpu"  # activations wait on the host

    stream.run(check)
    assert devices == {"cuda"}
    full = perplexity(_from_pretrained(tmp_path, torch.float32).cuda(), WINDOWS.cuda(), batch_size=2, progress=False)
    streamed = streaming_perplexity(tmp_path, WINDOWS, batch_size=2, device="cuda", dtype=torch.float32,
                                    progress=False)
    assert abs(streamed - full) <= 1e-5 * full


@pytest.mark.slow
def test_smollm2_streaming_perplexity_equals_the_full_model(smollm2_path):
    """The real default model (30 Llama blocks, tied head, float32 checkpoint) on Pride and Prejudice."""
    from pruning_core.lm import evaluation_windows, load_causal_lm, load_text, tokenize_corpus

    model, tokenizer = load_causal_lm(smollm2_path)
    windows = evaluation_windows(tokenize_corpus(tokenizer, load_text("pride_and_prejudice")), 4, 128)
    full = perplexity(model, windows, batch_size=2, progress=False)
    streamed = streaming_perplexity(smollm2_path, windows, batch_size=2, progress=False)
    assert abs(streamed - full) <= 1e-6 * full


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_unit_statistics_equal_the_full_models(tmp_path, name):
    """One-pass streaming statistics per unit (Linear, Conv1D, each MoE expert on its routed tokens,
    with Hessians) equal collect_activation_stats on the whole model."""
    from pruning_core.calibration import collect_activation_stats
    from pruning_core.lm.unit_stats import UnitStatistics

    make_tiny(name, layers=3).save_pretrained(tmp_path)
    batches = [WINDOWS[lo : lo + 2] for lo in range(0, WINDOWS.shape[0], 2)]
    want = collect_activation_stats(_from_pretrained(tmp_path, torch.float32), batches, hessian=True,
                                    progress=False)
    stream = LayerStream(tmp_path, WINDOWS, batch_size=2, head=False, progress=False)
    stats, got = UnitStatistics(hessian=True), {}

    def finish(i, block):
        context = stats.pop(i)
        assert context.num_samples == WINDOWS.shape[0]
        got.update(context)

    calibrate_blocks(stream, finish, observe=stats, sequential=False)
    in_blocks = [k for k in want.layer_names() if k.startswith(stream.reader.block_prefix + ".")]
    assert list(got) == in_blocks and not stats.contexts
    for key, acc in got.items():
        ref = want.require_stats(key)
        assert acc.count == ref.count, key
        torch.testing.assert_close(acc.sum_sq, ref.sum_sq, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(acc.xtx, ref.xtx, rtol=1e-6, atol=1e-9)
