"""Quality and sparsity measurements of pruned layers.

Stage: evaluation. :func:`reconstruction_error` is the relative output error of a pruned linear
layer on the calibration inputs, computed exactly from ``XᵀX`` without the tokens:
``‖(W - Ŵ)Xᵀ‖_F² = tr(ΔW XᵀX ΔWᵀ)`` for tokens ``X [N, in]`` and ``ΔW = W - Ŵ [out, in]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning_core.calibration.capture import Batch
from pruning_core.calibration.stats import ActivationStats
from pruning_core.errors import CalibrationRequired, ShapeMismatch
from pruning_core.validate import check_finite


def output_sq_error(delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """``tr(Δ XᵀX Δᵀ) = Σ_t ‖Δ x_t‖²`` in float64, for ``Δ [out, in]`` and ``XᵀX [in, in]``."""
    d = delta.detach().to(torch.float64)
    return float(((d @ xtx.to(d.device, torch.float64)) * d).sum())


def reconstruction_error(
    weight: torch.Tensor,
    new_weight: torch.Tensor,
    stats_or_xtx: ActivationStats | torch.Tensor,
    *,
    name: str | None = None,
) -> float:
    """Relative output error ``‖(W - Ŵ)Xᵀ‖_F / ‖W Xᵀ‖_F`` over the calibration tokens.

    Args:
        weight: original ``[out, in]`` weight.
        new_weight: pruned (and possibly updated) ``[out, in]`` weight.
        stats_or_xtx: the layer's :class:`ActivationStats` (collected with ``hessian=True``) or
            an ``XᵀX`` ``[in, in]`` tensor (any positive scale: the ratio does not depend on it).

    Returns:
        The ratio (0.0 when both norms are 0; ``inf`` when only ``‖WXᵀ‖`` is 0).

    Raises:
        ShapeMismatch: shapes disagree. CalibrationRequired: stats without ``XᵀX``.
        NumericalInstability: NaN/Inf in the inputs.
    """
    xtx = stats_or_xtx.xtx if isinstance(stats_or_xtx, ActivationStats) else stats_or_xtx
    if xtx is None:
        raise CalibrationRequired("reconstruction_error (statistics collected without hessian=True)", layer=name)
    if weight.shape != new_weight.shape or weight.dim() != 2:
        raise ShapeMismatch(list(weight.shape), list(new_weight.shape), name=name, reason="weights")
    if list(xtx.shape) != [weight.shape[1]] * 2:
        raise ShapeMismatch([weight.shape[1]] * 2, list(xtx.shape), name=name, reason="XᵀX")
    for what, t in (("weight", weight), ("new weight", new_weight), ("XᵀX", xtx)):
        check_finite(t, method="reconstruction_error", what=what, layer=name)
    err = output_sq_error(weight.to(torch.float64) - new_weight.to(weight.device, torch.float64), xtx)
    ref = output_sq_error(weight, xtx)
    if ref <= 0.0:
        return 0.0 if err <= 0.0 else math.inf
    return math.sqrt(max(err, 0.0) / ref)


def layer_output_errors(
    model: nn.Module,
    new_weights: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Relative output error ``‖X(W - Ŵ)ᵀ‖_F / ‖XWᵀ‖_F`` of each layer on the inputs it sees in ``model``.

    Runs ``batches`` through ``model`` (unchanged; hooks removed afterwards) and, at every layer
    named in ``new_weights``, compares its weight ``W`` with the pruned ``Ŵ`` on the actual
    inputs ``X`` of all tokens: the tokenwise counterpart of :func:`reconstruction_error`, for
    jobs that collected no ``XᵀX``.

    Args:
        model: the dense model (its Linear weights are ``W``).
        new_weights: layer name -> pruned ``[out, in]`` weight ``Ŵ``.
        batches: token tensors ``[B, T]`` or dicts of model keyword arguments.

    Returns:
        layer name -> relative error (0.0 if both norms are 0, ``inf`` if only ``‖XWᵀ‖`` is).
    """
    from pruning_core.calibration.capture import run_batch

    modules = {name: model.get_submodule(name) for name in new_weights}
    sums = {name: [0.0, 0.0] for name in modules}  # [‖XΔᵀ‖², ‖XWᵀ‖²]
    deltas = {}
    for name, module in modules.items():
        new = new_weights[name].to(module.weight.device, module.weight.dtype)
        if new.shape != module.weight.shape:
            raise ShapeMismatch(list(module.weight.shape), list(new.shape), name=name, reason="pruned weight")
        deltas[name] = module.weight.detach() - new

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output.reshape(-1, output.shape[-1])
            if getattr(module, "bias", None) is not None:
                y = y - module.bias
            sums[name][0] += float((x @ deltas[name].T).double().square().sum())
            sums[name][1] += float(y.double().square().sum())
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in tqdm(list(batches), desc="layer errors", disable=not progress):
                run_batch(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    return {n: (math.sqrt(e / r) if r > 0 else (0.0 if e <= 0 else math.inf)) for n, (e, r) in sums.items()}


def tensor_sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros (0.0 for an empty tensor)."""
    n = tensor.numel()
    return float((tensor == 0).sum()) / n if n else 0.0


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of False (pruned) entries of a keep mask (0.0 for an empty mask)."""
    n = mask.numel()
    return float((~mask.bool()).sum()) / n if n else 0.0


def layer_sparsity(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of zero weights per ``nn.Linear`` (all of them, or the named ones), by name."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            out[name] = tensor_sparsity(module.weight.detach())
    return out


def overall_sparsity(model: nn.Module, names: list[str] | None = None) -> float:
    """Fraction of zero weights over the selected ``nn.Linear`` weights together."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


__all__ = [
    "layer_output_errors",
    "layer_sparsity",
    "mask_sparsity",
    "output_sq_error",
    "overall_sparsity",
    "reconstruction_error",
    "tensor_sparsity",
]
