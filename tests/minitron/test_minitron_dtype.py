"""A checkpoint stored in bfloat16: Minitron loads it as stored, computes on a float32 copy on CPU,
and saves the chosen candidate in bfloat16 again, holding exactly the stored values it keeps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pruning_core.graph import apply_plan_
from pruning_core.minitron import (
    Architecture,
    build_candidate,
    candidate_plan,
    compute_scores,
    to_compute_dtype_,
    trace_decoder,
)
from tests.tiny_models import LLAMA_LIKE, VOCAB, make_tiny

BATCHES = [torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))]
TARGET = Architecture(num_layers=3, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("name", LLAMA_LIKE)
def test_bf16_checkpoint_is_pruned_in_float32_and_saved_in_bf16(name, tmp_path):
    make_tiny(name, dtype=torch.bfloat16, layers=4).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()  # the stored dtype
    assert next(model.parameters()).dtype == torch.bfloat16
    stored = to_compute_dtype_(model)
    assert stored == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    graph, structure = trace_decoder(model, BATCHES[0][:1, :8])
    plan = candidate_plan(model, graph, structure, compute_scores(model, BATCHES, structure), TARGET)
    candidate = build_candidate(model, plan, dtype=stored)
    candidate.save_pretrained(tmp_path / "pruned")

    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    direct = apply_plan_(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), plan)  # sliced in bf16
    reference = dict(direct.named_parameters())
    for key, value in reloaded.named_parameters():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key]), key
    assert Architecture.from_config(reloaded.config) == TARGET
