"""The one-shot job (``prune run``'s flow) on a tiny model of every supported family, streamed.

Each family runs once, the variants spread over the set: Wanda 50% (per-row) and SparseGPT 2:4,
one-pass and sequential calibration, float32 and bfloat16 checkpoints saved in several shards;
the Gemma families get a tokenizer that starts every sequence with BOS. For each run:

- the output has the input's dtype, shard file names, tensor names and shapes;
- it loads with ``from_pretrained`` and its whole-model perplexity equals the job's streamed one;
- every prunable unit (MoE experts, GPT-2 Conv1D in the math orientation) is exactly as sparse as
  its pattern says, its zeros are the saved mask, and the reported sparsity is the real zero
  fraction of the decoder weights;
- the per-unit table lists every expert with the calibration tokens routed to it.
"""

from __future__ import annotations

import math

import pytest
import torch

from flows.jobs import run_job
from pruning_core.arch import decoder_blocks, prunable_units
from pruning_core.io.masks import load_masks
from pruning_core.io.tensors import load_tensors
from pruning_core.lm import perplexity, stored_dtype
from pruning_core.lm.shards import CheckpointLayout
from tests.flows.oneshot_helpers import tiny_job
from tests.tiny_models import ARCHITECTURES, MOE, make_tiny

pytestmark = pytest.mark.flows

CAL = {"num_windows": 4, "window_length": 32, "batch_size": 4}
EVAL = {"num_windows": 2, "window_length": 32, "batch_size": 2, "error_windows": 2}
BF16, FP32 = torch.bfloat16, torch.float32
# family -> (stored dtype, method, calibration mode): every method, mode and dtype is covered
VARIANTS = {
    "llama": (BF16, "wanda", "one_pass"), "mistral": (FP32, "sparsegpt", "sequential"),
    "qwen2": (BF16, "sparsegpt", "one_pass"), "qwen3": (FP32, "wanda", "sequential"),
    "gemma2": (BF16, "wanda", "sequential"), "gemma3": (BF16, "sparsegpt", "one_pass"),
    "phi3": (BF16, "sparsegpt", "sequential"), "phi": (FP32, "wanda", "one_pass"),
    "olmo": (BF16, "wanda", "one_pass"), "stablelm": (FP32, "sparsegpt", "one_pass"),
    "falcon": (BF16, "wanda", "sequential"), "falcon_alibi": (FP32, "sparsegpt", "sequential"),
    "gpt_neox": (BF16, "sparsegpt", "one_pass"), "opt": (FP32, "wanda", "sequential"),
    "gpt2": (BF16, "sparsegpt", "one_pass"), "mixtral": (BF16, "wanda", "one_pass"),
    "qwen2_moe": (BF16, "sparsegpt", "sequential"),
}
BOS_FAMILIES = ("gemma2", "gemma3")


def test_every_family_has_a_variant():
    assert sorted(VARIANTS) == sorted(ARCHITECTURES)
    assert {v[0] for v in VARIANTS.values()} == {BF16, FP32}
    assert {(v[1], v[2]) for v in VARIANTS.values()} == {(m, c) for m in ("wanda", "sparsegpt")
                                                        for c in ("one_pass", "sequential")}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    """Short excerpts of the shipped texts (tokenizing whole books would dominate the runs)."""
    from pruning_core.lm import load_text

    root = tmp_path_factory.mktemp("texts")
    for name in ("emma", "pride_and_prejudice"):
        (root / f"{name}.txt").write_text(load_text(name)[:20_000])
    return str(root / "emma.txt"), str(root / "pride_and_prejudice.txt")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One SQLite MLflow store for the module's runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, but starting every sequence with ``<s>`` (as Gemma's does)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("a")["input_ids"][0] == 1
    return tok


def _save(root, name: str, dtype: torch.dtype, tokenizer):
    model = make_tiny(name, dtype=dtype)
    model.save_pretrained(root, max_shard_size="100KB")
    tokenizer.save_pretrained(root)
    return root


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def _check_layout(src, out, dtype):
    a, b = CheckpointLayout.read(src), CheckpointLayout.read(out)
    assert sorted(b.shards) == sorted(a.shards) and len(a.shards) > 1
    assert {n: (e.file, e.dtype, e.shape) for n, e in b.tensors.items()} == \
           {n: (e.file, e.dtype, e.shape) for n, e in a.tensors.items()}
    assert stored_dtype(out) == dtype


def _check_units(model, pattern: str, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Exact sparsity of every unit, zeros == mask; returns (zeros, weights) over all units."""
    zeros = total = 0
    units = prunable_units(model)
    assert {u.name for u in units} == set(masks)
    for unit in units:
        weight = unit.read(model)  # [out, in]: the math orientation, also for Conv1D and experts
        kept = weight != 0
        assert torch.equal(kept, masks[unit.name]), unit.name
        if pattern == "2:4":  # groups of 4 consecutive inputs of the math keep exactly 2
            assert bool((kept.reshape(unit.out_features, -1, 4).sum(-1) == 2).all()), unit.name
        else:  # Wanda's default per-row scope: every output row loses exactly half
            assert bool((kept.sum(1) == unit.in_features - unit.in_features // 2).all()), unit.name
        zeros, total = zeros + int((~kept).sum()), total + kept.numel()
    return zeros, total


def _check_experts(name: str, summary: dict, windows: torch.Tensor, model) -> None:
    """Every expert is in the table with its routed calibration tokens: top-k per token in total."""
    experts = [r for r in summary["layers"] if r["kind"] == "expert"]
    per_layer = len(decoder_blocks(model)[1])
    top_k = model.config.num_experts_per_tok
    assert len(experts) == per_layer * 2 * 4 and all(r["sparsity"] == 0.5 for r in experts)
    for block in range(per_layer):
        routed = [r["tokens"] for r in experts if f".{block}.mlp.experts.down_proj." in r["name"]]
        assert len(routed) == 4 and sum(routed) == top_k * windows.numel(), (name, routed)
    assert all(r["zero_token_expert"] == (r["tokens"] == 0) for r in experts)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_family(prefect_server, tracking, texts, tiny_tokenizer, bos_tokenizer, tmp_path, name):
    dtype, method, mode = VARIANTS[name]
    tokenizer = bos_tokenizer if name in BOS_FAMILIES else tiny_tokenizer
    src = _save(tmp_path / "in", name, dtype, tokenizer)
    sparsity = {"pattern": "2:4"} if method == "sparsegpt" else {"sparsity": 0.5}
    job = tiny_job(src, name=name, method=method, **sparsity, calibration={**CAL, "mode": mode, "text": texts[0]},
                   evaluation={**EVAL, "text": texts[1]}, tracking={"log_model": False})
    summary = run_job(job, tmp_path / "run")
    out = tmp_path / "run" / "model"
    _check_layout(src, out, dtype)
    windows = load_tensors(tmp_path / "run" / "windows.safetensors")
    assert bool((windows["evaluation"][:, 0] == 1).all()) == (name in BOS_FAMILIES)  # BOS where the model wants it
    model = _from_pretrained(out)
    zeros, total = _check_units(model, job.pattern, load_masks(tmp_path / "run" / "masks.safetensors"))
    assert summary["sparsity"] == pytest.approx(zeros / total, abs=1e-12) and summary["sparsity"] == 0.5
    after = perplexity(model, windows["evaluation"], batch_size=2, progress=False)
    assert math.isfinite(after) and after == pytest.approx(summary["perplexity_after"], rel=1e-4)
    assert math.isfinite(summary["perplexity_before"])
    if name in MOE:
        _check_experts(name, summary, windows["calibration"], model)


def test_dtype_override_casts_input_and_output(prefect_server, tracking, texts, tiny_tokenizer, tmp_path):
    """``dtype: float32`` on a bfloat16 checkpoint: the output is float32 (every tensor and config.json,
    twice the input's bytes), exactly 50% sparse, and its reloaded perplexity is the job's."""
    import json

    src = _save(tmp_path / "in", "qwen3", BF16, tiny_tokenizer)
    job = tiny_job(src, name="cast", method="wanda", sparsity=0.5, dtype="float32",
                   calibration={**CAL, "text": texts[0]}, evaluation={**EVAL, "text": texts[1]},
                   tracking={"log_model": False})
    summary = run_job(job, tmp_path / "run")
    out = tmp_path / "run" / "model"
    a, b = CheckpointLayout.read(src), CheckpointLayout.read(out)
    assert sorted(b.shards) == sorted(a.shards) and {e.dtype for e in b.tensors.values()} == {"F32"}
    assert sum(e.nbytes for e in b.tensors.values()) == 2 * sum(e.nbytes for e in a.tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32" and summary["dtype"] == "float32"
    model = _from_pretrained(out)
    zeros, total = _check_units(model, job.pattern, load_masks(tmp_path / "run" / "masks.safetensors"))
    assert summary["sparsity"] == pytest.approx(zeros / total, abs=1e-12) and summary["sparsity"] == 0.5
    windows = load_tensors(tmp_path / "run" / "windows.safetensors")
    after = perplexity(model, windows["evaluation"], batch_size=2, progress=False)
    assert after == pytest.approx(summary["perplexity_after"], rel=1e-4)
