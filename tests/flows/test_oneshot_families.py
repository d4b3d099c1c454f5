"""The one-shot job (``prune run``'s flow) on a tiny model of every supported family, streamed.

Each family runs once, the variants spread over the set: Wanda 50% (per-row) and SparseGPT 2:4,
one-pass and sequential calibration, float32 and bfloat16 checkpoints saved in several shards;
the Gemma families get a tokenizer that starts every sequence with BOS. For each run:

- the output has the input's dtype, shard file names, tensor names and shapes;
- it loads with ``from_pretrained`` and its whole-model perplexity equals the job's streamed one;
- every prunable unit (MoE experts, GPT-2 Conv1D in the math orientation) is exactly as sparse as
  its pattern says, its zeros are the saved mask, and the reported sparsity is the real zero
  fraction of the decoder weights;
- the per-unit table lists every expert with the calibration tokens routed to it;
- for the MoE families and GPT-2, the sparse export round-trips the checkpoint exactly.

Besides: ``dtype:`` casting a bf16 checkpoint to float32, an expert that no calibration token
reaches (pruned by magnitude, flagged), and a 2:4 export of a Conv1D model refused up front.
"""

from __future__ import annotations

import json
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
# families whose run also writes the sparse export (fused experts split per expert; Conv1D transposed)
EXPORTS = {"mixtral": "csr", "qwen2_moe": "semi_structured", "gpt2": "csr"}


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
                   evaluation={**EVAL, "text": texts[1]}, tracking={"log_model": False},
                   export={"sparse_format": EXPORTS.get(name, "none")})
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
    if name in EXPORTS:
        _check_export(summary, out, tmp_path / "run" / "sparse")


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


def _starve_expert(model, layer: int, expert: int) -> None:
    """Make ``expert`` of ``layer`` receive no token: embedding channel 0 is large and positive for
    every token (so the normalized router input's channel 0 is positive), and only that expert's
    router row reads it, with a large negative weight."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        router = model.model.layers[layer].mlp.gate.weight
        router[expert] = 0.0
        router[expert, 0] = -100.0


class _Warnings(list):
    """Collects the WARNING messages of the named loggers (Prefect's logging setup bypasses caplog)."""

    def __init__(self, *names: str) -> None:
        import logging

        super().__init__()
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.append(record.getMessage())
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self) -> _Warnings:
        for logger in self.loggers:
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.handler)


def test_an_expert_without_calibration_tokens_is_pruned_by_magnitude(prefect_server, tracking, texts, tiny_tokenizer,
                                                                      tmp_path):
    """The stated rule (pruning_core.calibration.hooks): an expert no calibration token was routed to
    is pruned by weight magnitude at the job's spec (Wanda: half of each row), with a warning and
    its row in the per-unit table flagged; the other experts keep Wanda's statistics."""
    dense = make_tiny("mixtral", dtype=FP32)
    _starve_expert(dense, layer=0, expert=3)
    dense.save_pretrained(tmp_path / "in")
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    job = tiny_job(tmp_path / "in", name="starved", method="wanda", sparsity=0.5,
                   calibration={**CAL, "text": texts[0]}, evaluation={**EVAL, "text": texts[1]},
                   tracking={"log_model": False})
    with _Warnings("flows.oneshot.tasks", "pruning_core.calibration.hooks") as warnings:
        summary = run_job(job, tmp_path / "run")
    rows = {r["name"]: r for r in summary["layers"] if r["kind"] == "expert"}
    starved = {n for n, r in rows.items() if r["tokens"] == 0}  # the forced one, and any the tiny data missed
    assert {f"model.layers.0.mlp.experts.{p}.3" for p in ("gate_up_proj", "down_proj")} <= starved
    assert {n for n, r in rows.items() if r["zero_token_expert"]} == starved
    assert all(rows[n]["sparsity"] == 0.5 for n in rows)
    warned = " ".join(warnings)
    assert all(f"{n}: no calibration token was routed to this expert; pruned by magnitude" in warned for n in starved)
    assert "received no calibration tokens (model.layers.0.mlp.experts.gate_up_proj" in warned
    pruned = _from_pretrained(tmp_path / "run" / "model")
    units = {u.name: u for u in prunable_units(dense)}
    for name in starved:  # exactly the largest half of |W| in each row survives, unchanged
        weight, new = units[name].read(dense), units[name].read(pruned)
        keep = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, weight.abs().topk(weight.shape[1] // 2, 1).indices, True)
        assert torch.equal(new != 0, keep) and torch.equal(new[keep], weight[keep]), name


def _check_export(summary: dict, out, export) -> None:
    """The sparse export holds exactly the checkpoint's tensors: fused MoE expert masks go to the
    per-expert tensors the checkpoint saves, Conv1D masks to its transposed storage; each pruned
    tensor is stored sparsely and comes back bit for bit (pruned positions as +0.0)."""
    from safetensors import safe_open

    from pruning_core.sparse import load_sparse_export

    saved = {}
    for file in CheckpointLayout.read(out).shards:
        with safe_open(str(out / file), "pt") as f:
            saved.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    back = load_sparse_export(export)
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k] + 0.0) for k in saved)
    info = json.loads((export / "sparse_index.json").read_text())
    sparse = {k for k, e in info["tensors"].items() if e["layout"] == info["format"]}
    split = sum(".experts.gate_up_proj." in r["name"] for r in summary["layers"])  # saved as gate and up
    assert len(sparse) == summary["sparse_export_size"]["layers"] == len(summary["layers"]) + split
    assert all(info["tensors"][k]["nnz"] * 2 == saved[k].numel() for k in sparse)
    if split:  # 2 blocks x 4 experts x (gate, up, down), by the checkpoint's per-expert names
        assert sum(".experts." in k for k in sparse) == 2 * 4 * 3 and split == 2 * 4


def test_a_two_four_export_of_a_conv1d_model_is_refused_up_front(prefect_server, tracking, texts, tiny_tokenizer,
                                                                 tmp_path):
    from pruning_core.errors import ConfigError

    src = _save(tmp_path / "in", "gpt2", FP32, tiny_tokenizer)
    job = tiny_job(src, name="gpt2-24", method="wanda", pattern="2:4", export={"sparse_format": "semi_structured"},
                   calibration={**CAL, "text": texts[0]}, evaluation={**EVAL, "text": texts[1]})
    with pytest.raises(ConfigError, match="saved transposed") as err:
        run_job(job, tmp_path / "run")
    assert err.value.field == "export.sparse_format" and not (tmp_path / "run" / "stats.parquet").exists()
