"""Every file name of a run directory, in one place (open_lth's ``foundations/paths.py``).

Stage: io. Flows and tests build paths only through these functions, so renaming an artifact
is a one-line change and two stages never disagree about where a file lives. Functions that
take a layer name refuse names that would leave their directory (``/``, ``..``).

Layout of a run directory::

    manifest.json            checksums of everything below (io.manifest)
    config.json              the resolved job configuration
    summary.json             the job's result (metrics, per-layer table)
    stats.parquet            calibration statistics, a row per layer x input channel
    hessians.safetensors     SparseGPT Hessians, one tensor per layer
    scores/<layer>.safetensors   per-layer scoring outputs (scores, pruned weight, mask)
    masks.safetensors        all masks, bit-packed (io.masks)
    layers.parquet           per-layer table (sparsity, reconstruction error)
    model/                   the pruned model, a Hugging Face directory
    sparse/                  optional sparse-format export
    rounds/<NNN>/            one sub-run per iterative round (Lottery Ticket levels)
"""

from __future__ import annotations

import os
from pathlib import Path

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import safe_child

PathLike = str | os.PathLike[str]


def _leaf(root: PathLike, directory: str, name: str, suffix: str) -> Path:
    """``root/directory/<name><suffix>``, refusing names with path separators or ``..``."""
    if not name or "/" in name or "\\" in name or name in {".", ".."} or "\x00" in name:
        raise ArtifactError(name, "a layer name must be a single path component (no '/', '\\\\' or '..')")
    safe_child(Path(root) / directory, name + suffix)
    return Path(root) / directory / (name + suffix)


def manifest(root: PathLike) -> Path:
    return Path(root) / "manifest.json"


def config(root: PathLike) -> Path:
    return Path(root) / "config.json"


def summary(root: PathLike) -> Path:
    return Path(root) / "summary.json"


def stats(root: PathLike) -> Path:
    return Path(root) / "stats.parquet"


def hessians(root: PathLike) -> Path:
    return Path(root) / "hessians.safetensors"


def scores_dir(root: PathLike) -> Path:
    return Path(root) / "scores"


def layer_scores(root: PathLike, layer: str) -> Path:
    """Scoring output of one layer, e.g. ``scores/model.layers.0.mlp.up_proj.safetensors``."""
    return _leaf(root, "scores", layer, ".safetensors")


def masks(root: PathLike) -> Path:
    return Path(root) / "masks.safetensors"


def layers_table(root: PathLike) -> Path:
    return Path(root) / "layers.parquet"


def model(root: PathLike) -> Path:
    return Path(root) / "model"


def sparse_export(root: PathLike) -> Path:
    return Path(root) / "sparse"


def round_dir(root: PathLike, index: int) -> Path:
    """Sub-run directory of iterative round ``index`` (``rounds/003``)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ArtifactError(str(index), "a round index must be a non-negative int")
    return Path(root) / "rounds" / f"{index:03d}"


__all__ = [
    "config",
    "hessians",
    "layer_scores",
    "layers_table",
    "manifest",
    "masks",
    "model",
    "round_dir",
    "scores_dir",
    "sparse_export",
    "stats",
    "summary",
]
