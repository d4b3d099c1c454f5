"""Sequential (block-by-block) one-shot pruning of a decoder model, as the Wanda and SparseGPT
reference scripts do (locuslab/wanda ``prune_wanda``, IST-DASLab/sparsegpt ``llama_sequential``).

Stage: apply. For each decoder block i: collect the statistics of its Linear layers on its
inputs, prune all of them, then run the *pruned* block to get block i+1's inputs. Only Linear
layers inside the decoder blocks are pruned (the output head never is). Flows that run each block
in its own task use the steps directly: ``capture_block_inputs``, ``calibrate_block``,
``prune_module(block, method, spec, stats, prefix=...)``, ``run_block``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn
from tqdm.auto import tqdm

from pruning_core.arch import decoder_blocks
from pruning_core.calibration.capture import Batch
from pruning_core.calibration.sequential import calibrate_block, capture_block_inputs, run_block
from pruning_core.errors import ConfigError
from pruning_core.masks import MaskScope, SparsitySpec
from pruning_core.methods.base import Method, check_scope
from pruning_core.pruning.model import LayerFilter, prune_module
from pruning_core.pruning.result import PruningResult

logger = logging.getLogger(__name__)


def prune_sequential(
    model: nn.Module,
    batches: Iterable[Batch],
    method: Method,
    spec: SparsitySpec,
    *,
    filter_fn: LayerFilter | None = None,
    dataset: str = "",
    measure_memory: bool = True,
    progress: bool = True,
) -> PruningResult:
    """Prune ``model``'s decoder blocks one after the other, in memory.

    Args:
        model: a decoder model whose blocks :func:`pruning_core.arch.decoder_blocks` finds (Llama family:
            ``model.model.layers``).
        batches: calibration token tensors ``[B, T]`` or dicts of model keyword arguments.
        method, spec, filter_fn: as :func:`prune_module` (``filter_fn`` sees full qualified
            names); GLOBAL scope is not possible block by block.
        dataset: the calibration dataset's name (recorded in the statistics).

    Returns:
        The merged :class:`PruningResult` over all blocks.

    Raises:
        ConfigError: a GLOBAL scope, or one the method does not support.
    """
    if spec.scope is MaskScope.GLOBAL:
        raise ConfigError("scope", "GLOBAL scope needs every layer at once; use prune_module, not prune_sequential")
    check_scope(method, spec)
    path, blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, batches, progress=False)
    results = []
    for i, block in enumerate(tqdm(blocks, desc=f"{method.name} (sequential)", unit="block", disable=not progress)):
        prefix = f"{path}.{i}."
        ctx = (calibrate_block(block, inputs, hessian=method.needs_hessian, prefix=prefix, dataset=dataset)
               if method.needs_stats or method.needs_hessian else None)
        results.append(prune_module(block, method, spec, ctx, filter_fn=filter_fn, prefix=prefix,
                                    measure_memory=measure_memory))
        inputs = run_block(block, inputs)
        logger.debug("block %d: sparsity %.4f", i, results[-1].achieved_sparsity)
    return PruningResult.merge(results)


__all__ = ["prune_sequential"]
