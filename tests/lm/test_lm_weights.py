"""Partial checkpoint reads: one layer's weight, one decoder block, sharded checkpoints."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import ArtifactError
from pruning_core.lm.weights import load_decoder_block, read_weight, weight_files


@pytest.fixture
def saved_llama(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "single")
    tiny_llama.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    return tiny_llama, tmp_path


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_read_weight_and_block_equal_the_model(saved_llama, layout):
    model, root = saved_llama
    directory = root / layout
    if layout == "sharded":
        assert len(set(weight_files(directory).values())) > 1
    w = read_weight(directory, "model.layers.1.mlp.down_proj")
    assert torch.equal(w, model.model.layers[1].mlp.down_proj.weight)
    block = load_decoder_block(directory, 1)
    assert block.self_attn.layer_idx == 1
    for (name, ref), got in zip(model.model.layers[1].state_dict().items(), block.state_dict().values(), strict=True):
        assert torch.equal(ref, got), name
    hidden = torch.randn(2, 5, model.config.hidden_size)
    pos = torch.arange(5).unsqueeze(0)
    emb = model.model.rotary_emb(hidden, pos)
    with torch.no_grad():
        ref_out = model.model.layers[1](hidden, position_embeddings=emb, attention_mask=None)
        out = block(hidden, position_embeddings=emb, attention_mask=None)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, ref_out)


def test_missing_tensor_and_block_errors(saved_llama):
    _, root = saved_llama
    with pytest.raises(ArtifactError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        read_weight(root / "single", "model.layers.9.mlp.up_proj")
    with pytest.raises(ArtifactError, match="block 5 does not exist .the model has 2"):
        load_decoder_block(root / "single", 5)
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        weight_files(root)
