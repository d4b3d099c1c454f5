"""The streaming engine composed with the method contract: a one-shot job block by block.

What a flow does (``get_method(...).prune_weight`` on every ``prunable_units`` unit of each
streamed block, statistics from :class:`UnitStatistics`, output through :class:`CheckpointWriter`)
gives the same weights as pruning the whole model in memory with statistics of the whole model
(one-pass), keeps exact N:M per unit (experts included), the input's dtype and layout, and reloads.
"""

from __future__ import annotations

import pytest
import torch

from pruning_core.arch import decoder_blocks, prunable_units
from pruning_core.calibration import collect_activation_stats
from pruning_core.lm import CheckpointWriter, LayerStream, UnitStatistics, calibrate_blocks
from pruning_core.lm.shards import CheckpointLayout
from pruning_core.masks.spec import SparsitySpec
from pruning_core.methods.registry import get_method
from tests.tiny_models import make_tiny

WINDOWS = torch.randint(3, 384, (4, 32), generator=torch.Generator().manual_seed(1))


def _from_pretrained(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _prune_units(root, units, stats_of, method, spec):
    for unit in units:
        weight, _ = method.prune_weight(unit.read(root).clone(), stats_of(unit.name), spec, name=unit.name)
        unit.write(root, weight)


def _stream_job(src, out, method, spec, *, sequential):
    stream = LayerStream(src, WINDOWS, batch_size=2, head=False, progress=False)
    stats = UnitStatistics(hessian=method.needs_hessian)

    def finish(i, block):
        context = stats.pop(i)
        units = prunable_units(block, prefix=f"{stream.reader.block_prefix}.{i}.")
        _prune_units(block, units, context.get_stats, method, spec)
        return {"units": len(units)}

    with CheckpointWriter(stream.reader, out) as writer:
        records = calibrate_blocks(stream, finish, observe=stats, sequential=sequential, writer=writer)
        writer.finish()
    return records


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "gemma3"])
def test_one_pass_wanda_equals_the_in_memory_reference(tmp_path, name):
    make_tiny(name, dtype=torch.bfloat16, layers=3).save_pretrained(tmp_path / "in")
    method, spec = get_method("wanda"), SparsitySpec.parse(0.5, scope="row")
    _stream_job(tmp_path / "in", tmp_path / "out", method, spec, sequential=False)
    reference = _from_pretrained(tmp_path / "in", torch.float32)
    batches = [WINDOWS[lo : lo + 2] for lo in range(0, WINDOWS.shape[0], 2)]
    context = collect_activation_stats(reference, batches, progress=False)
    _prune_units(reference, prunable_units(reference), context.get_stats, method, spec)
    pruned = _from_pretrained(tmp_path / "out", torch.bfloat16)
    assert pruned.dtype == torch.bfloat16
    want = reference.to(torch.bfloat16).state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "qwen2_moe", "falcon_alibi"])
def test_sequential_sparsegpt_2_4_every_unit_and_reloads(tmp_path, name):
    make_tiny(name, dtype=torch.bfloat16, layers=3).save_pretrained(tmp_path / "in", max_shard_size="60KB")
    records = _stream_job(tmp_path / "in", tmp_path / "out", get_method("sparsegpt"), SparsitySpec.parse(0.5, "2:4"),
                          sequential=True)
    assert sorted(records) == [0, 1, 2] and all(r["units"] > 0 for r in records.values())
    src, out = CheckpointLayout.read(tmp_path / "in"), CheckpointLayout.read(tmp_path / "out")
    assert {n: (e.file, e.dtype, e.shape) for n, e in out.tensors.items()} == \
           {n: (e.file, e.dtype, e.shape) for n, e in src.tensors.items()}
    pruned = _from_pretrained(tmp_path / "out", torch.bfloat16)
    blocks = decoder_blocks(pruned)[1]
    for i, block in enumerate(blocks):
        for unit in prunable_units(block):
            groups = (unit.read(block) != 0).reshape(unit.out_features, -1, 4).sum(dim=-1)
            assert bool((groups <= 2).all()), f"block {i} {unit.name}"
    with torch.no_grad():
        out_ids = pruned.generate(torch.tensor([[5, 17, 250]]), max_new_tokens=3, do_sample=False)
    assert out_ids.shape == (1, 6)
