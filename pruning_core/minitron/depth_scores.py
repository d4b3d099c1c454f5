"""Depth importance from calibration data, layer selection, and the depth plan.

Stage: scores -> plan. Two importance signals (Minitron Sec. 2.2, ShortGPT Eq. 1):

- Block Importance per layer, from hooks on the decoder layers (per-token cosine);
- the LM-loss increase when a layer, or a contiguous block of ``block_size`` layers, is
  dropped (the model is run without it; nothing is copied).

Selection is one-shot (rank once), contiguous (:func:`select_block`: the block of ``k``
layers whose removal raises the loss least), or iterative (remove the least important layer,
recompute the scores on the shallower model, repeat: :func:`bi_iterative`,
:func:`loss_iterative`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import decoder_blocks
from pruning_core.errors import CalibrationRequired, InvalidSparsity
from pruning_core.graph.structured import LayerRemoval, StructuredPlan
from pruning_core.minitron.bi import BlockImportanceScores, block_importance
from pruning_core.minitron.families import text_config
from pruning_core.minitron.loss import lm_loss
from pruning_core.validate import check_finite

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_blocks(model)[1]


@contextlib.contextmanager
def without_layers(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run ``model`` without the decoder layers ``removed`` (no copy; restored after).

    ``config.layer_types`` follows, so every remaining layer keeps its own attention type and
    mask (Gemma's alternating sliding/full attention), exactly as after :func:`depth_plan`.
    """
    path, full = decoder_blocks(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    kept = [i for i in range(len(full)) if i not in set(removed)]
    config = text_config(model)
    layer_types = getattr(config, "layer_types", None)
    per_layer = isinstance(layer_types, list) and len(layer_types) == len(full)
    setattr(parent, attr, nn.ModuleList([full[i] for i in kept]))
    if per_layer:
        config.layer_types = [layer_types[i] for i in kept]
    try:
        yield model
    finally:
        setattr(parent, attr, full)
        if per_layer:
            config.layer_types = layer_types


def collect_block_importance(
    model: nn.Module, batches: Sequence[torch.Tensor], *, progress: bool = False
) -> BlockImportanceScores:
    """Per-token Block Importance of every decoder layer of ``model`` on ``batches``."""
    if not batches:
        raise CalibrationRequired("collect_block_importance")
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def hook(index: int) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            total, count = block_importance(h_in, h_out)
            sums[index] += total
            counts[index] += count
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="block importance", disable=not progress, leave=False):
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    scores = tuple((i, 1.0 - sums[i] / counts[i]) for i in range(len(layers)))
    return BlockImportanceScores(scores, counts[0] if counts else 0)


def layer_drop_losses(
    model: nn.Module, batches: Sequence[torch.Tensor], *, block_size: int = 1, progress: bool = False
) -> torch.Tensor:
    """LM-loss increase when layers ``[s, s + block_size)`` are dropped, for every start ``s``.

    Returns:
        ``[num_layers - block_size + 1]`` float64: ``loss(without block s) - loss(dense)``.
    """
    num_layers = len(decoder_layers(model))
    if not 1 <= block_size < num_layers:
        raise InvalidSparsity(float(block_size), f"block_size must be in [1, {num_layers - 1}] for {num_layers} layers")
    base = lm_loss(model, batches)
    increases = []
    for start in tqdm(range(num_layers - block_size + 1), desc="layer-drop loss", disable=not progress, leave=False):
        with without_layers(model, range(start, start + block_size)):
            increases.append(lm_loss(model, batches) - base)
    result = torch.tensor(increases, dtype=torch.float64)
    check_finite(result, method="layer_drop_losses", what="loss increase")
    return result


def block_drop_losses(
    model: nn.Module, batches: Sequence[torch.Tensor], block_sizes: Sequence[int], *, progress: bool = False
) -> dict[int, torch.Tensor]:
    """:func:`layer_drop_losses` for every block size in ``block_sizes`` (``{k: [L - k + 1]}``)."""
    return {int(k): layer_drop_losses(model, batches, block_size=int(k), progress=progress) for k in sorted(set(block_sizes))}


def select_block(block_losses: torch.Tensor, block_size: int) -> list[int]:
    """The contiguous block ``[s, s + block_size)`` with the smallest loss increase (ties: lower ``s``).

    Args:
        block_losses: ``[L - block_size + 1]``, entry ``s`` for the block starting at layer ``s``
            (:func:`layer_drop_losses` with this ``block_size``).

    Returns:
        The block's layer indices, ascending.
    """
    if block_size < 1 or block_losses.ndim != 1 or block_losses.numel() < 1:
        raise InvalidSparsity(float(block_size), f"need block_size >= 1 and one loss per start, got {block_losses.shape}")
    check_finite(block_losses, method="select_block", what="block loss increase")
    start = int(torch.sort(block_losses.double(), stable=True).indices[0])
    return list(range(start, start + block_size))


def select_one_shot(scores: torch.Tensor, num_remove: int, *, min_layers: int = 1) -> list[int]:
    """The ``num_remove`` lowest-scored layers (ties: lower index first), ascending."""
    _check_remove(len(scores), num_remove, min_layers)
    check_finite(scores, method="select_one_shot", what="layer scores")
    order = torch.sort(scores.double(), stable=True).indices
    return sorted(int(i) for i in order[:num_remove])


def select_iterative(
    num_layers: int,
    num_remove: int,
    score_fn: Callable[[list[int]], torch.Tensor],
    *,
    min_layers: int = 1,
) -> list[int]:
    """Greedy removal with recomputation: repeat ``num_remove`` times — score the layers still
    present (``score_fn(removed_so_far) -> [num_present]`` scores, in layer order), remove the
    lowest (ties: lower index). Returns original layer indices **in removal order** (greedy,
    so the first ``j`` entries are the answer for ``j`` layers).

    With scores that do not depend on what was removed, the set equals :func:`select_one_shot`.
    """
    _check_remove(num_layers, num_remove, min_layers)
    removed: list[int] = []
    for _ in range(num_remove):
        present = [i for i in range(num_layers) if i not in removed]
        scores = score_fn(list(removed))
        if len(scores) != len(present):
            raise InvalidSparsity(float(len(scores)), f"score_fn returned {len(scores)} scores for {len(present)} layers")
        check_finite(scores, method="select_iterative", what="layer scores")
        removed.append(present[int(torch.sort(scores.double(), stable=True).indices[0])])
        logger.debug("iterative depth selection: removed layer %d", removed[-1])
    return removed


def bi_iterative(model: nn.Module, batches: Sequence[torch.Tensor], num_remove: int, *, min_layers: int = 1) -> list[int]:
    """Iterative Block-Importance selection on ``model`` (BI recomputed after every removal).

    Returns original layer indices in removal order.
    """

    def score(removed: list[int]) -> torch.Tensor:
        with without_layers(model, removed):
            bi = collect_block_importance(model, batches)
        return torch.tensor([s for _, s in bi.scores], dtype=torch.float64)

    return select_iterative(len(decoder_layers(model)), num_remove, score, min_layers=min_layers)


def loss_iterative(model: nn.Module, batches: Sequence[torch.Tensor], num_remove: int, *, min_layers: int = 1) -> list[int]:
    """Iterative LM-loss selection: drop the layer whose removal raises the loss least, recompute
    the layer-drop losses on the shallower model, repeat. ``L + (L - 1) + ...`` forward passes of
    ``batches`` per removal step (the most expensive criterion).

    Returns original layer indices in removal order (greedy, so a prefix answers fewer removals).
    """

    def score(removed: list[int]) -> torch.Tensor:
        with without_layers(model, removed):
            return layer_drop_losses(model, batches)

    return select_iterative(len(decoder_layers(model)), num_remove, score, min_layers=min_layers)


def depth_plan(model: nn.Module, removed: Sequence[int]) -> StructuredPlan:
    """A plan that removes decoder layers ``removed`` (original indices) from ``model``."""
    path, layers = decoder_blocks(model)
    num_layers = len(layers)
    removal = LayerRemoval(path, num_layers, tuple(removed))
    return StructuredPlan((), (removal,) if removal.indices else (), {"num_hidden_layers": num_layers - len(removal.indices)})


def _check_remove(num_layers: int, num_remove: int, min_layers: int) -> None:
    if num_remove < 0 or num_remove > num_layers - min_layers:
        raise InvalidSparsity(
            float(num_remove), f"cannot remove {num_remove} of {num_layers} layers and keep min_layers {min_layers}"
        )


__all__ = [
    "bi_iterative",
    "block_drop_losses",
    "collect_block_importance",
    "decoder_layers",
    "depth_plan",
    "layer_drop_losses",
    "loss_iterative",
    "select_block",
    "select_iterative",
    "select_one_shot",
    "without_layers",
]
