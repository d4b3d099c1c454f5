"""The inputs each unit saw, kept just large enough to measure its output error exactly.

Stage: calibration. The per-unit table reports ``‖(W - Ŵ)Xᵀ‖_F / ‖W Xᵀ‖_F`` over the
calibration tokens ``X [n, in]``. Holding one float64 ``XᵀX`` per unit for it costs ``8·in²``
bytes per unit: 1.8 GB for one block of a 7 B Llama (q, k, v, o, gate, up at 4096² and down at
11008²), more than the block itself. :class:`InputSample` keeps instead

- the tokens themselves (float32 rows) while ``n ≤ in``, then
- their Gram matrix ``XᵀX`` (float32, ``[in, in]``) once more tokens than channels arrived,

so its memory is ``4·min(n, in)·in`` bytes and the error stays exact either way. Units that read
the very same tensor (q/k/v, gate/up) share one sample (:func:`attach_sample_hooks`): a 7 B block
on 2,048 tokens needs 190 MB instead of 1.8 GB. MoE experts get their routed tokens through the
experts hook of :mod:`pruning_core.calibration.hooks` (rows: routing makes ``n`` small).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruning_core.arch.units import PrunableUnit
from pruning_core.calibration.hooks import experts_hook, hook_argument
from pruning_core.errors import ConfigError, ShapeMismatch
from pruning_core.validate import check_finite

ROWS_PER_CHUNK = 1024  # output rows of W per matmul when measuring (bounds the workspace)


class InputSample:
    """The tokens ``X [n, in]`` one input received: rows while ``n ≤ in``, else ``XᵀX``.

    Attributes:
        in_features: ``in``. count: tokens seen.
    """

    def __init__(self, in_features: int, *, name: str | None = None) -> None:
        self.in_features, self.name, self.count = in_features, name, 0
        self._rows: list[torch.Tensor] = []
        self._gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x [..., in]`` (any float dtype; kept as float32 on ``x``'s device)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeMismatch([-1, self.in_features], list(x.shape), name=self.name,
                                reason=f"activations must be [..., {self.in_features}]")
        tokens = x.detach().reshape(-1, self.in_features).to(torch.float32)
        self.count += tokens.shape[0]
        if self._gram is None and self.count <= self.in_features:
            self._rows.append(tokens.clone() if tokens.data_ptr() == x.data_ptr() else tokens)
            return
        if self._gram is None:  # more tokens than channels: the Gram matrix is now the smaller form
            self._gram = torch.zeros(self.in_features, self.in_features, device=tokens.device)
            for rows in self._rows:
                self._gram.addmm_(rows.T, rows)
            self._rows = []
        self._gram.addmm_(tokens.T, tokens)

    @property
    def nbytes(self) -> int:
        """Bytes held (rows or Gram matrix)."""
        held = [self._gram] if self._gram is not None else self._rows
        return sum(t.numel() * t.element_size() for t in held)

    def squared_output_norm(self, weight: torch.Tensor) -> float:
        """``Σ_t ‖W x_t‖² = ‖W Xᵀ‖_F²`` (float64 sum) for ``weight [out, in]``, a chunk of rows at a time."""
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ShapeMismatch([-1, self.in_features], list(weight.shape), name=self.name, reason="weight")
        total = 0.0
        for lo in range(0, weight.shape[0], ROWS_PER_CHUNK):
            w = weight[lo : lo + ROWS_PER_CHUNK].to(torch.float32)
            if self._gram is not None:
                w = w.to(self._gram.device)
                total += float(((w @ self._gram) * w).sum(dtype=torch.float64))
            else:
                total += sum(float((r @ w.to(r.device).T).square().sum(dtype=torch.float64)) for r in self._rows)
        return total

    def relative_error(self, weight: torch.Tensor, new_weight: torch.Tensor) -> float | None:
        """``‖(W - Ŵ)Xᵀ‖_F / ‖W Xᵀ‖_F`` (None without tokens; 0.0 if both norms are 0, inf if only ``‖WXᵀ‖``).

        Raises:
            ShapeMismatch: shapes disagree. NumericalInstability: NaN/Inf in either weight.
        """
        if weight.shape != new_weight.shape:
            raise ShapeMismatch(list(weight.shape), list(new_weight.shape), name=self.name, reason="weights")
        if self.count == 0:
            return None
        for what, t in (("weight", weight), ("new weight", new_weight)):
            check_finite(t, method="reconstruction_error", what=what, layer=self.name)
        ref = self.squared_output_norm(weight)
        err = self.squared_output_norm(weight.to(torch.float32) - new_weight.to(weight.device, torch.float32))
        if ref <= 0.0:
            return 0.0 if err <= 0.0 else math.inf
        return math.sqrt(max(err, 0.0) / ref)


class _SharedInputs:
    """Per batch, which sample each input tensor went to: units reading the same tensor share it."""

    def __init__(self) -> None:
        self.by_unit: dict[str, InputSample] = {}
        self._fed: dict[int, tuple[torch.Tensor, InputSample]] = {}  # id(input) -> (input, its sample)
        self._fed_samples: dict[int, torch.Tensor] = {}  # id(sample) -> the input it got this batch

    def clear(self) -> None:
        self._fed, self._fed_samples = {}, {}

    def feed(self, name: str, in_features: int, x: torch.Tensor) -> None:
        sample = self.by_unit.get(name)
        if sample is None:  # first batch: share the sample of a unit that got this very tensor
            known = self._fed.get(id(x))
            sample = known[1] if known is not None and known[0] is x else InputSample(in_features, name=name)
            self.by_unit[name] = sample
        fed = self._fed_samples.get(id(sample))
        if fed is x:
            return
        if fed is not None:
            raise ConfigError("layers", f"'{name}' shares its input sample with another unit, but the two "
                              "received different tensors in this batch")
        sample.update(x)
        self._fed[id(x)], self._fed_samples[id(sample)] = (x, sample), x


def attach_sample_hooks(root: nn.Module, units: Sequence[PrunableUnit], *,
                        prefix: str = "") -> tuple[list[Any], _SharedInputs]:
    """Hooks filling one :class:`InputSample` per unit of ``root`` (keys ``prefix + unit.name``;
    shared between units fed the same tensor). Call ``.clear()`` on the returned collector after
    each batch and remove the handles when done; its ``by_unit`` holds the samples."""
    shared, handles = _SharedInputs(), []
    groups: dict[str, list[PrunableUnit]] = {}
    for unit in units:
        groups.setdefault(unit.module, []).append(unit)
    for path, group in groups.items():
        module = root.get_submodule(path) if path else root
        if group[0].expert is None:
            names = [(prefix + u.name, u.in_features) for u in group]
            handles.append(module.register_forward_hook(_sample_hook(shared, names), with_kwargs=True))
            continue
        samples = {(u.expert, u.param): InputSample(u.in_features, name=prefix + u.name) for u in group}
        shared.by_unit.update({prefix + u.name: samples[(u.expert, u.param)] for u in group})
        handles.append(module.register_forward_hook(experts_hook(samples), with_kwargs=True))
    return handles, shared


def _sample_hook(shared: _SharedInputs, names: list[tuple[str, int]]) -> Any:
    """Hook of a Linear / Conv1D: its input ``[..., in]`` goes to each of its units' samples."""

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        x = hook_argument(args, kwargs, 0, ("input", "x", "hidden_states"))
        for name, in_features in names:
            shared.feed(name, in_features, x)

    return hook


__all__ = ["InputSample", "attach_sample_hooks"]
