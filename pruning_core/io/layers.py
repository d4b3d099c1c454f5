"""Per-layer pruning outputs: the keep mask (bit-packed) and, when the method updates weights
(SparseGPT), the new weight; or the layer's importance scores, for a later global selection.

Stage: io. Per-layer tasks of a job write one file each (``paths.layer_scores``) and return its
path; the assembling step reads them back. Files are written atomically by
:func:`pruning_core.io.tensors.save_tensors`.
"""

from __future__ import annotations

import os

import torch

from pruning_core.errors import ArtifactError
from pruning_core.io.masks import pack_mask, unpack_mask
from pruning_core.io.tensors import load_tensors, read_metadata, save_tensors

PathLike = str | os.PathLike[str]


def save_layer_result(path: PathLike, mask: torch.Tensor, weight: torch.Tensor | None = None,
                      *, scores: torch.Tensor | None = None) -> None:
    """Write a layer's keep ``mask`` (bool, packed 8 per byte), optional new ``weight`` and ``scores``."""
    tensors = {"mask": pack_mask(mask)}
    if weight is not None:
        tensors["weight"] = weight.detach().to("cpu").contiguous()
    if scores is not None:
        tensors["scores"] = scores.detach().to("cpu").contiguous()
    save_tensors(path, tensors, metadata={"shape": ",".join(str(d) for d in mask.shape)})


def load_layer_result(path: PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep mask, new weight or None)`` from :func:`save_layer_result`."""
    meta = read_metadata(path)
    if "shape" not in meta:
        raise ArtifactError(str(path), "not a layer result (no 'shape' metadata)")
    shape = tuple(int(d) for d in meta["shape"].split(",") if d)
    tensors = load_tensors(path)
    mask = unpack_mask(tensors["mask"], shape, name=str(path))
    return mask, tensors.get("weight")


def load_layer_scores(path: PathLike) -> torch.Tensor:
    """The importance scores stored by :func:`save_layer_result` (``scores=``)."""
    tensors = load_tensors(path, ["scores"])
    return tensors["scores"]


def has_scores(path: PathLike) -> bool:
    """Whether the layer file holds importance scores (not yet replaced by a selected mask)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "scores" in f.keys()  # noqa: SIM118


__all__ = ["has_scores", "load_layer_result", "load_layer_scores", "save_layer_result"]
