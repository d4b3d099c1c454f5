"""Filling a module built on the meta device: loaded tensors, recomputed buffers, a completeness check.

Stage: inputs (used by :mod:`pruning_core.lm.checkpoint`). ``from_pretrained`` builds the model on
the meta device, assigns the loaded tensors, then lets the model's ``_init_weights`` compute what
checkpoints do not hold (non-persistent buffers such as rotary ``inv_freq`` or Gemma's
``embed_scale``) while skipping every loaded tensor (``_is_hf_initialized``). These helpers do the
same for one block or for the shell, and refuse to leave anything uninitialized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruning_core.errors import ArtifactError


def set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter or buffer ``name`` of ``root`` (marked as loaded)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if attr in owner._parameters:
        owner._parameters[attr] = value = nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value = tensor
    else:
        raise ArtifactError(name, f"{type(owner).__name__} has no parameter or buffer '{attr}'")
    value._is_hf_initialized = True  # transformers' init functions skip loaded tensors


def init_nonpersistent(model: Any, root: nn.Module, device: str | torch.device, *, skip: str | None = None) -> None:
    """Recompute ``root``'s non-persistent buffers with the model's own ``_init_weights``."""
    from transformers.initialization import guard_torch_init_functions

    owners: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if skip and (name + ".").startswith(skip):
            continue
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None and buf.is_meta:
                filler = float("nan") if buf.is_floating_point() else 0
                module._buffers[attr] = torch.full_like(buf, filler, device=device)
                owners[name] = module
    with torch.no_grad(), guard_torch_init_functions():
        for module in owners.values():
            model._init_weights(module)
    for name, module in owners.items():
        for attr in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(attr)
            if buf is not None and buf.is_floating_point() and bool(torch.isnan(buf).any()):
                raise ArtifactError(name or type(module).__name__, f"non-persistent buffer '{attr}' was not "
                                    "recomputed by the model's _init_weights")


def check_materialized(root: nn.Module, prefix: str, where: str, *, skip: tuple[str, ...] = ()) -> None:
    """Raise :class:`ArtifactError` if a parameter or buffer (outside ``skip``) is still on meta."""
    left = [n for n, t in [*root.named_parameters(), *root.named_buffers()]
            if t.is_meta and not any(n == s or n.startswith(s) for s in skip)]
    if left:
        raise ArtifactError(where, f"{len(left)} tensors of '{prefix or 'the model'}' were not loaded: {left[:5]}")


__all__ = ["check_materialized", "init_nonpersistent", "set_tensor"]
