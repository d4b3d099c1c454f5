"""Every file name of a run directory, in one place (open_lth's ``foundations/paths.py``).

Stage: io. Flows and tests build paths only through these functions, so renaming an artifact
is a one-line change and two stages never disagree about where a file lives. Functions that
take a layer or candidate name refuse names that would leave their directory (``/``, ``..``).

Layout of a run directory (every job kind)::

    job.json                 the owner (job hash) and the directory's run uid (flows.rundir)
    .run.lock                held (shared) by every live run of the directory
    manifest.json            checksums of everything below (io.manifest)
    config.json              the resolved job configuration
    timings.json             seconds per stage (the first run's, kept on resume)
    summary.json             the job's result
    inputs.json              the resolved model and what the job derived from it
    windows.safetensors      token windows: calibration, evaluation (+ distillation)
    perplexity_<which>.json  perplexity of the dense (before) or pruned/chosen (after) model
    model/                   the pruned or chosen model, a Hugging Face directory
    input-model/             the input model cast to the job's ``dtype`` (only when that differs
                             from the dtype it is stored in): what the job reads instead

One-shot (``job: oneshot``)::

    stats.parquet            calibration statistics, a row per layer x input channel
    hessians/block_NNN.safetensors  SparseGPT Hessians of block NNN's units (one-pass mode)
    scores/<layer>.safetensors   per-layer result (mask, updated weight or scores)
    global-plan.json         the global threshold and each layer's kept ties (streamed selection)
    global-selection.json    marker: the global threshold was applied to every layer
    stats/block_NNN.parquet  sequential mode: statistics of block NNN's units
    masks.safetensors        all masks, bit-packed (io.masks)
    layers.json              per-unit table (sparsity, reconstruction error, routed tokens)
    sparse/                  optional sparse-format export
    allocation.json          non-uniform allocation (allocation.Allocation.to_dict): OWL or a reused file
    allocation_targets.json  its per-layer sparsities, rounded to this job's comparison groups
    allocation.png           sparsity per unit versus depth, with the target line
    search/state.json        allocation search: grid, start levels and search state (saved every step)
    search/variants/unit_NNN.safetensors  allocation search: unit NNN pruned at every grid level
    recovery/trainer.pt      recovery: the trainer's last checkpoint (step, weights, optimizer)
    recovery/curve.json      recovery: loss per step (the finished stage's record)
    recovery/loss.png        recovery: the loss curve
    quantized_layers/<layer>.safetensors  joint quantization: a layer's codes, scales and report
    quantized_blocks/NNN.safetensors  optional quantization: block NNN's packed tensors
    model-quantized/         the quantized model, compressed-tensors pack-quantized (deployable)
    model-dequantized/       the same weights dequantized, laid out like model/ (evaluated, resumable)
    quantization.json        the quantization's per-layer report
    speed.json               measured prefill/decode speed of the dense and the output model

Minitron (``job: minitron``)::

    scores.parquet           every importance score, computed once
    candidates/<id>/plan.json, result.json   one per candidate
    chosen.json              the chosen candidate's size and greedy sample

Lottery Ticket (``job: lottery``)::

    tickets/<config hash>/   the library's TicketStore (round_NNN/ticket.*)
    rounds/round_NNN.json    round record and learning curves, written just before its ticket
    accuracy_vs_density.png  the search's figure
"""

from __future__ import annotations

import os
from pathlib import Path

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import safe_child
from pruning_core.io.manifest import MANIFEST_NAME

PathLike = str | os.PathLike[str]


def _leaf(root: PathLike, directory: str, name: str, suffix: str = "") -> Path:
    """``root/directory/<name><suffix>``, refusing names with path separators or ``..``."""
    if not name or "/" in name or "\\" in name or name in {".", ".."} or "\x00" in name:
        raise ArtifactError(name, "a layer or candidate name must be a single path component (no '/', '\\\\' or '..')")
    safe_child(Path(root) / directory, name + suffix)
    return Path(root) / directory / (name + suffix)


def _index(index: int) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ArtifactError(str(index), "a block or round index must be a non-negative int")
    return f"{index:03d}"


# -- every job --------------------------------------------------------------------------------------
def job_record(root: PathLike) -> Path:
    return Path(root) / "job.json"


def run_lock(root: PathLike) -> Path:
    return Path(root) / ".run.lock"


def manifest(root: PathLike) -> Path:
    return Path(root) / MANIFEST_NAME


def config(root: PathLike) -> Path:
    return Path(root) / "config.json"


def timings(root: PathLike) -> Path:
    return Path(root) / "timings.json"


def summary(root: PathLike) -> Path:
    return Path(root) / "summary.json"


def inputs(root: PathLike) -> Path:
    return Path(root) / "inputs.json"


def windows(root: PathLike) -> Path:
    return Path(root) / "windows.safetensors"


def perplexity(root: PathLike, which: str) -> Path:
    """``perplexity_before.json`` (dense model) or ``perplexity_after.json`` (pruned/chosen model)."""
    if which not in ("before", "after"):
        raise ArtifactError(which, "perplexity is measured 'before' or 'after' pruning")
    return Path(root) / f"perplexity_{which}.json"


def model(root: PathLike) -> Path:
    return Path(root) / "model"


def input_model(root: PathLike) -> Path:
    return Path(root) / "input-model"


# -- one-shot -----------------------------------------------------------------------------------------
def stats(root: PathLike) -> Path:
    return Path(root) / "stats.parquet"


def hessians(root: PathLike) -> Path:
    return Path(root) / "hessians.safetensors"


def layer_scores(root: PathLike, layer: str) -> Path:
    """Result of one layer, e.g. ``scores/model.layers.0.mlp.up_proj.safetensors``."""
    return _leaf(root, "scores", layer, ".safetensors")


def global_plan(root: PathLike) -> Path:
    return Path(root) / "global-plan.json"


def global_selection(root: PathLike) -> Path:
    return Path(root) / "global-selection.json"


def block_inputs(root: PathLike, index: int) -> Path:
    """Sequential mode: the inputs of decoder block ``index`` (``block_inputs/003.safetensors``)."""
    return Path(root) / "block_inputs" / f"{_index(index)}.safetensors"


def quantized_block(root: PathLike, index: int) -> Path:
    """Quantization: block ``index``'s packed tensors (``quantized_blocks/003.safetensors``)."""
    return Path(root) / "quantized_blocks" / f"{_index(index)}.safetensors"


def layer_quantized(root: PathLike, layer: str) -> Path:
    """Joint quantization: one layer's codes, scales and report (``quantized_layers/<layer>.safetensors``)."""
    return _leaf(root, "quantized_layers", layer, ".safetensors")


def quantized_model(root: PathLike) -> Path:
    return Path(root) / "model-quantized"


def dequantized_model(root: PathLike) -> Path:
    return Path(root) / "model-dequantized"


def quantization_report(root: PathLike) -> Path:
    return Path(root) / "quantization.json"


def speed(root: PathLike) -> Path:
    return Path(root) / "speed.json"


def block_stats(root: PathLike, index: int) -> Path:
    """Sequential mode: the statistics of block ``index``'s layers (``stats/block_003.parquet``)."""
    return Path(root) / "stats" / f"block_{_index(index)}.parquet"


def block_hessians(root: PathLike, index: int) -> Path:
    """One-pass mode: the ``XᵀX`` of block ``index``'s units (``hessians/block_003.safetensors``)."""
    return Path(root) / "hessians" / f"block_{_index(index)}.safetensors"


def masks(root: PathLike) -> Path:
    return Path(root) / "masks.safetensors"


def layers_table(root: PathLike) -> Path:
    return Path(root) / "layers.json"


def sparse_export(root: PathLike) -> Path:
    return Path(root) / "sparse"


def allocation(root: PathLike) -> Path:
    return Path(root) / "allocation.json"


def allocation_targets(root: PathLike) -> Path:
    return Path(root) / "allocation_targets.json"


def allocation_figure(root: PathLike) -> Path:
    return Path(root) / "allocation.png"


def search_state(root: PathLike) -> Path:
    return Path(root) / "search" / "state.json"


def search_variants(root: PathLike, unit: int) -> Path:
    return Path(root) / "search" / "variants" / f"unit_{_index(unit)}.safetensors"


def recovery_state(root: PathLike) -> Path:
    return Path(root) / "recovery" / "trainer.pt"


def recovery_curve(root: PathLike) -> Path:
    return Path(root) / "recovery" / "curve.json"


def recovery_figure(root: PathLike) -> Path:
    return Path(root) / "recovery" / "loss.png"


# -- Minitron -------------------------------------------------------------------------------------------
def scores_table(root: PathLike) -> Path:
    return Path(root) / "scores.parquet"


def candidate_plan(root: PathLike, candidate: str) -> Path:
    return _leaf(root, "candidates", candidate) / "plan.json"


def candidate_result(root: PathLike, candidate: str) -> Path:
    return _leaf(root, "candidates", candidate) / "result.json"


def chosen(root: PathLike) -> Path:
    return Path(root) / "chosen.json"


# -- Lottery Ticket ---------------------------------------------------------------------------------------
def tickets(root: PathLike, config_hash: str) -> Path:
    """The root of the search's :class:`pruning_core.lottery.TicketStore` (``tickets/<config hash>``)."""
    return _leaf(root, "tickets", config_hash)


def round_record(root: PathLike, index: int) -> Path:
    """Round ``index``'s record and learning curves (``rounds/round_003.json``)."""
    return Path(root) / "rounds" / f"round_{_index(index)}.json"


def accuracy_figure(root: PathLike) -> Path:
    return Path(root) / "accuracy_vs_density.png"
