"""lm.checkpoint / lm.writer: reading blocks and shells by module names, writing the output block by block."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pruning_core.arch import decoder_blocks
from pruning_core.errors import ArtifactError, NumericalInstability
from pruning_core.io.atomic import is_temporary
from pruning_core.io.manifest import Manifest
from pruning_core.lm.checkpoint import CheckpointReader
from pruning_core.lm.shards import INDEX_FILE, CheckpointLayout
from pruning_core.lm.writer import JOURNAL, CheckpointWriter, staging_dir
from tests.tiny_models import ARCHITECTURES, make_tiny

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = [(name, dt) for name in ARCHITECTURES for dt in DTYPES]


def _from_pretrained(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _outside(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix + ".")}


@pytest.mark.parametrize(("name", "dt"), FAMILIES, ids=[f"{n}-{d}" for n, d in FAMILIES])
def test_blocks_and_shell_equal_from_pretrained(tmp_path, name, dt):
    """Every block and the shell (incl. recomputed non-persistent buffers) equal what from_pretrained loads."""
    make_tiny(name, dtype=DTYPES[dt]).save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    assert reader.stored_dtype == DTYPES[dt] and reader.num_blocks == 2
    ref = _from_pretrained(tmp_path)  # compute dtype float32, as the stream uses on CPU
    prefix, blocks = decoder_blocks(ref)
    assert reader.block_prefix == prefix
    for i in range(reader.num_blocks):
        block = reader.load_block(i, dtype=torch.float32)
        assert type(block) is type(blocks[i]) and not block.training
        got, want = block.state_dict(), blocks[i].state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    shell = reader.load_shell(dtype=torch.float32)
    got, want = _outside(shell.state_dict(), prefix), _outside(ref.state_dict(), prefix)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    buffers = dict(ref.named_buffers())
    for key, buf in shell.named_buffers():  # rotary inv_freq, Gemma's embed_scale: recomputed, not garbage
        if not key.startswith(prefix + "."):
            assert buf.dtype == buffers[key].dtype and torch.equal(buf, buffers[key]), key
    tied = ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    assert (shell.get_output_embeddings().weight is shell.get_input_embeddings().weight) == tied


def test_shell_without_head_leaves_an_untied_head_on_meta(tmp_path):
    make_tiny("mistral").save_pretrained(tmp_path)
    shell = CheckpointReader(tmp_path).load_shell(head=False)
    assert shell.lm_head.weight.is_meta and not shell.model.embed_tokens.weight.is_meta
    make_tiny("llama").save_pretrained(tmp_path / "tied")  # tied: the head is the embedding, always there
    shell = CheckpointReader(tmp_path / "tied").load_shell(head=False)
    assert shell.lm_head.weight is shell.model.embed_tokens.weight and not shell.lm_head.weight.is_meta


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_checkpoints_per_expert_and_fused(tmp_path, name):
    """transformers 5 saves experts one by one; a fused checkpoint also loads; both map back to their own names."""
    model = make_tiny(name)
    model.save_pretrained(tmp_path / "per_expert")
    saved = CheckpointLayout.read(tmp_path / "per_expert").tensors
    expert = ("model.layers.1.block_sparse_moe.experts.3.w3.weight" if name == "mixtral"
              else "model.layers.1.mlp.experts.3.up_proj.weight")
    assert expert in saved and "model.layers.1.mlp.experts.gate_up_proj" not in saved
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    model.config.save_pretrained(fused_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    experts = model.model.layers[1].mlp.experts
    for directory in (tmp_path / "per_expert", fused_dir):
        reader = CheckpointReader(directory)
        block = reader.load_block(1, dtype=torch.float32)
        assert torch.equal(block.mlp.experts.gate_up_proj, experts.gate_up_proj)
        assert torch.equal(block.mlp.experts.down_proj, experts.down_proj)
        back = reader.to_checkpoint(1, block)
        assert set(back) == set(reader.block_names(1))
        assert set(back) <= set(CheckpointLayout.read(directory).tensors)
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            for key, value in back.items():
                assert torch.equal(value, f.get_tensor(key)), key


def test_unreadable_checkpoints_fail_up_front(tmp_path):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    state = {k: v for k, v in model.state_dict().items() if k not in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")}
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"1 model tensors are not in the checkpoint.*layers.1.mlp.up_proj"):
        CheckpointReader(tmp_path / "m")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"has shape \[3, 3\], the model expects \[128, 64\]"):
        CheckpointReader(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ArtifactError, match="header"):
        CheckpointReader(tmp_path / "m")
    with pytest.raises(ArtifactError, match="no config.json"):
        CheckpointReader(tmp_path)


def test_a_buffer_the_model_cannot_recompute_is_an_error(tmp_path, monkeypatch):
    make_tiny("llama").save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    monkeypatch.setattr(type(reader.template(torch.float32)), "_init_weights", lambda self, module: None)
    with pytest.raises(ArtifactError, match="model.rotary_emb.*non-persistent buffer 'inv_freq' was not recomputed"):
        reader.load_shell(dtype=torch.float32)


# ---------------------------------------------------------------------------------------- writer
def _prune_rows(block):
    """A deterministic stand-in for pruning: zero the smaller half of each row of every 2-D weight."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                flat = p.reshape(-1, p.shape[-1])
                idx = flat.abs().argsort(dim=-1, stable=True)[:, : p.shape[-1] // 2]
                flat.scatter_(-1, idx, 0)
    return block


def _write_pruned(reader, out, *, key="", stop_after=None):
    writer = CheckpointWriter(reader, out, key=key)
    for i in range(reader.num_blocks):
        if i in writer.done_blocks:
            continue
        block = _prune_rows(reader.load_block(i))  # stored dtype: the same arithmetic as the full model
        writer.write_block(i, block, record={"block": i})
        if stop_after == i:
            writer.close()
            return None
    return writer.finish(extra={"method": "rows"})


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.name.endswith(".safetensors") or p.name == INDEX_FILE}


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_writer_output_equals_save_pretrained(tmp_path, name, dt, shard):
    model = make_tiny(name, dtype=DTYPES[dt], layers=3)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path / "in", **kwargs)
    reader = CheckpointReader(tmp_path / "in")
    assert (len(reader.layout.shards) > 1) == (shard is not None)
    out = _write_pruned(reader, tmp_path / "out")
    for block in decoder_blocks(model)[1]:
        _prune_rows(block)
    model.save_pretrained(tmp_path / "ref", **kwargs)
    assert _files(out) == _files(tmp_path / "ref")  # names, shards, index, dtypes: byte for byte
    assert json.loads((out / "pruning_info.json").read_text()) == {"method": "rows"}
    assert (out / "config.json").read_bytes() == (tmp_path / "in" / "config.json").read_bytes()
    Manifest(out).verify()
    assert not staging_dir(out).exists()
    reloaded = _from_pretrained(out, DTYPES[dt])
    ids = torch.tensor([[5, 17, 250, 3]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
        got = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_dense_save_is_the_input_byte_for_byte(tmp_path, tiny_tokenizer):
    model = make_tiny("qwen2_moe", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "in", max_shard_size="30KB")
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    reader = CheckpointReader(tmp_path / "in")
    writer = CheckpointWriter(reader, tmp_path / "out")
    for i in range(reader.num_blocks):  # read in the compute dtype, written back in the stored one
        writer.write_block(i, reader.load_block(i, dtype=torch.float32))
    out = writer.finish()
    assert _files(out) == _files(tmp_path / "in")
    weights = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert weights(out) == weights(tmp_path / "in")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tmp_path / "in" / f).read_bytes()


def test_crash_after_block_k_resumes_and_gives_identical_bytes(tmp_path):
    make_tiny("gemma2", dtype=torch.bfloat16, layers=4).save_pretrained(tmp_path / "in", max_shard_size="40KB")
    reader = CheckpointReader(tmp_path / "in")
    straight = _write_pruned(reader, tmp_path / "straight")
    assert _write_pruned(reader, tmp_path / "out", key="job", stop_after=1) is None
    staged = staging_dir(tmp_path / "out")
    assert not is_temporary(staged.name)  # a run-directory sweep keeps it
    writer = CheckpointWriter(reader, tmp_path / "out", key="job")
    assert writer.done_blocks == [0, 1] and writer.records() == {0: {"block": 0}, 1: {"block": 1}}
    assert torch.equal(writer.load_block(1).mlp.up_proj.weight, _prune_rows(reader.load_block(1)).mlp.up_proj.weight)
    writer.close()
    with open(staged / JOURNAL, "a") as f:  # a torn append of block 2's journal line
        f.write('{"block": 2, "tens')
    out = _write_pruned(reader, tmp_path / "out", key="job")
    assert _files(out) == _files(straight)
    assert json.loads((out / "pruning_info.json").read_text()) == {"method": "rows"}


def test_a_different_job_restarts_and_bad_tensors_are_refused(tmp_path):
    make_tiny("llama", layers=3).save_pretrained(tmp_path / "in")
    reader = CheckpointReader(tmp_path / "in")
    _write_pruned(reader, tmp_path / "out", key="a", stop_after=1)
    assert CheckpointWriter(reader, tmp_path / "out", key="b").done_blocks == []
    writer = CheckpointWriter(reader, tmp_path / "out", key="b")
    block = reader.load_block(2)
    with torch.no_grad():
        block.mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalInstability, match="model.layers.2.mlp.up_proj.weight"):
        writer.write_block(2, block)
    with pytest.raises(ArtifactError, match=r"shape \[2, 2\] differs"):
        writer.write_tensors({"model.norm.weight": torch.zeros(2, 2)})
    with pytest.raises(ArtifactError, match="has no tensors"):
        writer.write_tensors({"model.nope": torch.zeros(2)})
    assert writer.done_blocks == []
    writer.close()


@pytest.mark.parametrize(("name", "src", "dst"), [("mixtral", "bf16", "fp32"), ("gpt2", "fp32", "bf16")])
def test_a_dtype_writer_equals_save_pretrained_in_that_dtype(tmp_path, name, src, dst):
    """``CheckpointWriter(dtype=...)``: the pruned blocks and every copied tensor in the new dtype,
    byte for byte what ``save_pretrained`` writes for the model cast to it; config.json says so."""
    model = make_tiny(name, dtype=DTYPES[src], layers=2)
    model.save_pretrained(tmp_path / "in")
    reader = CheckpointReader(tmp_path / "in")
    writer = CheckpointWriter(reader, tmp_path / "out", dtype=DTYPES[dst])
    for i in range(reader.num_blocks):
        writer.write_block(i, _prune_rows(reader.load_block(i)))
    out = writer.finish()
    for block in decoder_blocks(model)[1]:
        _prune_rows(block)
    model.to(DTYPES[dst]).save_pretrained(tmp_path / "ref")
    assert _files(out) == _files(tmp_path / "ref")
    assert json.loads((out / "config.json").read_text())["dtype"] == str(DTYPES[dst]).removeprefix("torch.")
    assert CheckpointReader(out).stored_dtype == DTYPES[dst]
    Manifest(out).verify()


def test_cast_checkpoint_keeps_shards_and_refuses_an_overflow(tmp_path):
    from pruning_core.lm import cast_checkpoint

    make_tiny("qwen2_moe", dtype=torch.bfloat16).save_pretrained(tmp_path / "in", max_shard_size="30KB")
    out = cast_checkpoint(tmp_path / "in", tmp_path / "f32", torch.float32)
    a, b = CheckpointLayout.read(tmp_path / "in"), CheckpointLayout.read(out)
    assert sorted(a.shards) == sorted(b.shards) and len(a.shards) > 1
    assert {n: (e.file, e.shape) for n, e in a.tensors.items()} == {n: (e.file, e.shape) for n, e in b.tensors.items()}
    assert {e.dtype for e in b.tensors.values()} == {"F32"}
    assert sum(e.nbytes for e in b.tensors.values()) == 2 * sum(e.nbytes for e in a.tensors.values())
    assert json.loads(b.index)["metadata"]["total_size"] == sum(e.nbytes for e in b.tensors.values())
    for file in a.shards:
        with safe_open(str(tmp_path / "in" / file), "pt") as x, safe_open(str(out / file), "pt") as y:
            assert all(torch.equal(x.get_tensor(k).float(), y.get_tensor(k)) for k in x.keys())  # noqa: SIM118
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e6  # beyond float16's 65504
    model.save_pretrained(tmp_path / "big")
    with pytest.raises(NumericalInstability, match=r"model.layers.1.mlp.down_proj.weight' as F16"):
        cast_checkpoint(tmp_path / "big", tmp_path / "f16", torch.float16)
