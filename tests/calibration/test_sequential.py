"""Sequential (block-by-block) calibration on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruning_core.calibration import (
    BlockInputs,
    calibrate_block,
    capture_block_inputs,
    collect_activation_stats,
    find_decoder_blocks,
    run_block,
)
from pruning_core.errors import ConfigError


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 12), generator=g), torch.randint(0, 128, (1, 12), generator=g)]


def test_blocks_found(tiny_llama):
    path, blocks = find_decoder_blocks(tiny_llama)
    assert path == "model.layers" and len(blocks) == 2
    with pytest.raises(ConfigError):
        find_decoder_blocks(torch.nn.Linear(2, 2))


def test_block_by_block_reproduces_the_full_forward(tiny_llama):
    batches = _batches()
    inputs = capture_block_inputs(tiny_llama, batches, progress=False)
    assert inputs.num_batches == 2 and inputs.num_samples == 3
    embeds = tiny_llama.model.embed_tokens(batches[0])
    assert torch.equal(inputs.hidden_states[0], embeds)
    for block in tiny_llama.model.layers:
        inputs = run_block(block, inputs)
    with torch.no_grad():
        for b, hs in zip(batches, inputs.hidden_states, strict=True):
            logits = tiny_llama.lm_head(tiny_llama.model.norm(hs))
            torch.testing.assert_close(logits, tiny_llama(b).logits, rtol=1e-5, atol=1e-5)


def test_sequential_stats_equal_one_pass_on_dense_model(tiny_llama):
    batches = _batches()
    full = collect_activation_stats(tiny_llama, batches, hessian=True, progress=False)
    inputs = capture_block_inputs(tiny_llama, batches, progress=False)
    for i, block in enumerate(tiny_llama.model.layers):
        ctx = calibrate_block(block, inputs, hessian=True, prefix=f"model.layers.{i}.")
        assert ctx.num_samples == 3
        assert len(ctx) == 7
        for name, stats in ctx:
            ref = full.require_stats(name)
            assert stats.count == ref.count
            torch.testing.assert_close(stats.sum_sq, ref.sum_sq, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(stats.xtx, ref.xtx, rtol=1e-5, atol=1e-6)
        inputs = run_block(block, inputs)


def test_pruned_block_changes_the_next_inputs(tiny_llama):
    inputs = capture_block_inputs(tiny_llama, _batches(), progress=False)
    dense_next = run_block(tiny_llama.model.layers[0], inputs)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight.zero_()
    pruned_next = run_block(tiny_llama.model.layers[0], inputs)
    assert not torch.allclose(dense_next.hidden_states[0], pruned_next.hidden_states[0])


def test_block_inputs_serialize_as_plain_tensors(tiny_llama, tmp_path):
    inputs = capture_block_inputs(tiny_llama, _batches(), progress=False)
    tensors = inputs.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert "hidden_states.1" in tensors and "kwargs.0.position_embeddings#1" in tensors
    save_file(tensors, tmp_path / "inputs.safetensors")
    back = BlockInputs.from_tensors(load_file(tmp_path / "inputs.safetensors"))
    assert back.kwargs[0].keys() == inputs.kwargs[0].keys()
    assert back.kwargs[0]["use_cache"] is False
    block = tiny_llama.model.layers[0]
    out_a, out_b = run_block(block, inputs), run_block(block, back)
    assert torch.equal(out_a.hidden_states[1], out_b.hidden_states[1])


def test_real_value_error_is_not_swallowed(tiny_llama):
    def boom(*_args):
        raise ValueError("a real error in the embedding")

    handle = tiny_llama.model.embed_tokens.register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="real error"):
            capture_block_inputs(tiny_llama, _batches(), progress=False)
    finally:
        handle.remove()
    assert not tiny_llama.model.layers[0]._forward_pre_hooks
