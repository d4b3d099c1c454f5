"""All Minitron importance scores of one dense model, computed once, as plain tensors / columns.

Stage: scores (the cached artifact). ModelOpt's searcher saves the scores so the model can be
re-pruned to any target without recomputing them; here :class:`MinitronScores` is that
artifact. :meth:`MinitronScores.to_columns` gives one long table (the flow writes it as
Parquet; this package never touches disk):

============  =======  ===========================================================
column        type     meaning
============  =======  ===========================================================
``axis``      string   ``layer_bi`` | ``layer_loss`` | ``block_loss`` | ``hidden`` |
                       ``neuron`` | ``head``
``layer``     int32    decoder layer (``-1`` for ``hidden``; first layer of the block
                       for ``block_loss``)
``index``     int32    channel / neuron / head index (``0`` for ``layer_*`` rows; the
                       block size for ``block_loss``)
``score``     float64  importance; higher = more important (BI, loss increase, activation)
============  =======  ===========================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.minitron.config import DEFAULT_WIDTH_CONFIG, WidthImportanceConfig
from pruning_core.minitron.depth_scores import block_drop_losses, collect_block_importance, layer_drop_losses
from pruning_core.minitron.structure import DecoderStructure
from pruning_core.minitron.width_scores import WidthScores, collect_width_scores

AXES = ("layer_bi", "layer_loss", "block_loss", "hidden", "neuron", "head")


@dataclass(frozen=True)
class MinitronScores:
    """Depth and width importance of a dense model (float64 tensors).

    Attributes:
        block_importance: ``[L]`` Block Importance per layer.
        layer_loss: ``[L]`` LM-loss increase when the layer is dropped, or None if not computed.
        width: hidden ``[H]``, neurons ``[L, I]``, heads ``[L, Hq]``.
        block_loss: ``{k: [L - k + 1]}`` LM-loss increase when layers ``[s, s + k)`` are dropped,
            for the block sizes computed (empty if none).
    """

    block_importance: torch.Tensor
    layer_loss: torch.Tensor | None
    width: WidthScores
    block_loss: Mapping[int, torch.Tensor] = field(default_factory=dict)

    def to_columns(self) -> dict[str, list[Any]]:
        """The long table described in the module docstring (plain Python lists)."""
        cols: dict[str, list[Any]] = {"axis": [], "layer": [], "index": [], "score": []}

        def add(axis: str, layer: torch.Tensor, index: torch.Tensor, score: torch.Tensor) -> None:
            cols["axis"] += [axis] * score.numel()
            cols["layer"] += layer.reshape(-1).tolist()
            cols["index"] += index.reshape(-1).tolist()
            cols["score"] += score.double().reshape(-1).tolist()

        num_layers = self.block_importance.numel()
        layers = torch.arange(num_layers)
        add("layer_bi", layers, torch.zeros_like(layers), self.block_importance)
        if self.layer_loss is not None:
            add("layer_loss", layers, torch.zeros_like(layers), self.layer_loss)
        for k, losses in sorted(self.block_loss.items()):
            starts = torch.arange(losses.numel())
            add("block_loss", starts, torch.full_like(starts, int(k)), losses)
        hidden = self.width.hidden
        add("hidden", torch.full_like(hidden, -1, dtype=torch.long), torch.arange(hidden.numel()), hidden)
        for axis, mat in (("neuron", self.width.neurons), ("head", self.width.heads)):
            rows, idx = torch.meshgrid(torch.arange(mat.shape[0]), torch.arange(mat.shape[1]), indexing="ij")
            add(axis, rows, idx, mat)
        return cols

    @classmethod
    def from_columns(cls, cols: Mapping[str, Sequence[Any]], *, num_tokens: int = 0) -> MinitronScores:
        """Inverse of :meth:`to_columns` (row order does not matter)."""
        missing = {"axis", "layer", "index", "score"} - set(cols)
        if missing:
            raise ConfigError("scores", f"missing columns {sorted(missing)}")
        by_axis: dict[str, list[tuple[int, int, float]]] = {a: [] for a in AXES}
        for axis, layer, index, score in zip(cols["axis"], cols["layer"], cols["index"], cols["score"], strict=True):
            if axis not in by_axis:
                raise ConfigError("scores.axis", f"unknown axis {axis!r}; expected one of {AXES}")
            by_axis[axis].append((int(layer), int(index), float(score)))
        width = WidthScores(
            hidden=_matrix(by_axis["hidden"])[0], neurons=_matrix(by_axis["neuron"]),
            heads=_matrix(by_axis["head"]), num_tokens=num_tokens,
        )
        loss = by_axis["layer_loss"]
        blocks: dict[int, list[tuple[int, int, float]]] = {}
        for start, k, score in by_axis["block_loss"]:
            blocks.setdefault(k, []).append((start, 0, score))
        block_loss = {k: _matrix(rows)[:, 0] for k, rows in sorted(blocks.items())}
        return cls(_matrix(by_axis["layer_bi"])[:, 0], _matrix(loss)[:, 0] if loss else None, width, block_loss)


def _matrix(rows: list[tuple[int, int, float]]) -> torch.Tensor:
    """Rows (layer, index, score) as a dense ``[layers, size]`` tensor; every cell exactly once."""
    if not rows:
        raise ConfigError("scores", "an axis has no rows")
    layers = sorted({r[0] for r in rows})
    size = max(r[1] for r in rows) + 1
    pos = {layer: i for i, layer in enumerate(layers)}
    out = torch.full((len(layers), size), float("nan"), dtype=torch.float64)
    for layer, index, score in rows:
        out[pos[layer], index] = score
    contiguous = layers == [-1] or layers == list(range(len(layers)))
    if bool(out.isnan().any()) or len(rows) != out.numel() or not contiguous:
        raise ConfigError("scores", f"incomplete or duplicated score table ({len(rows)} rows for layers {layers[:3]}...)")
    return out


def compute_scores(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    structure: DecoderStructure,
    *,
    width_config: WidthImportanceConfig = DEFAULT_WIDTH_CONFIG,
    loss_batches: Sequence[torch.Tensor] | None = None,
    layer_loss: bool = True,
    block_sizes: Sequence[int] = (),
    progress: bool = False,
) -> MinitronScores:
    """Every importance score the search needs, from the dense ``model``.

    Args:
        batches: calibration token ids for BI and width importance (one forward each).
        loss_batches: token ids for the LM-loss increases below (one forward per layer or
            block; pass fewer windows here, it is the expensive part). None: none computed.
        layer_loss: with ``loss_batches``, the increase per dropped layer (``layer_loss``).
        block_sizes: with ``loss_batches``, the increase per dropped contiguous block of each
            of these sizes (``block_loss``, for the ``loss_block`` depth criterion).
    """
    bi = collect_block_importance(model, batches, progress=progress)
    width = collect_width_scores(model, batches, structure, width_config, progress=progress)
    per_layer = layer_drop_losses(model, loss_batches, progress=progress) if loss_batches and layer_loss else None
    blocks = block_drop_losses(model, loss_batches, block_sizes, progress=progress) if loss_batches and block_sizes else {}
    return MinitronScores(bi.as_tensor(structure.num_layers), per_layer, width, blocks)


__all__ = ["AXES", "MinitronScores", "compute_scores"]
