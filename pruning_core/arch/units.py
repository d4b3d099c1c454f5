"""Prunable units: every weight matrix the one-shot methods prune, in the orientation of the math.

Stage: foundation. :func:`prunable_units` is the ONE layer selector of the pipeline. A unit is
one 2-D weight ``W [out, in]`` with ``y = x @ Wᵀ``, wherever the model stores it:

- ``nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``): ``module.weight [out, in]``;
  Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are plain Linears, one unit each;
- GPT-2's ``transformers.pytorch_utils.Conv1D``: ``weight`` stored ``[in, out]`` (``transposed``);
  :meth:`PrunableUnit.read` returns ``[out, in]`` and :meth:`PrunableUnit.write` stores it back
  transposed, so statistics, masks, N:M groups and the SparseGPT solve all run along the input
  dimension of the math;
- fused mixture-of-experts parameters (transformers 5.x Mixtral, Qwen2-MoE):
  ``experts.gate_up_proj [E, 2·ffn, hidden]`` and ``experts.down_proj [E, hidden, ffn]``, one
  unit per expert and parameter, named ``<experts module>.<param>.<expert>``.

Never units: the LM head (also when tied to the embeddings), embeddings, and routers (the
``gate`` / ``router`` / ``shared_expert_gate`` siblings of an ``experts`` module). On a model
with decoder blocks (:func:`~pruning_core.arch.layout.decoder_blocks`) only the weights inside
the blocks are units, as in the Wanda/SparseGPT references (Linears beside the blocks, such as
OPT-350m's embedding projections ``project_in``/``project_out``, are not pruned). Inside a scanned
module every parameter with two or more dimensions must be a unit or a known non-prunable part
(embedding, router, head); anything else raises :class:`UnsupportedArchitecture` naming the
block and the module pattern, so nothing is ever skipped silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from pruning_core.arch.layout import decoder_blocks
from pruning_core.errors import ShapeMismatch, UnsupportedArchitecture

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
# Layout flags set by transformers' ``use_experts_implementation`` and the values supported here.
_EXPERT_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}


@dataclass(frozen=True)
class PrunableUnit:
    """One prunable 2-D weight, in the math orientation ``[out, in]``.

    Attributes:
        name: key of the unit's statistics and results: ``prefix`` + module path, plus
            ``.<param>.<expert>`` for experts (``"model.layers.0.mlp.experts.down_proj.3"``).
        module: path of the module holding the parameter, relative to the root that
            :func:`prunable_units` scanned (``read``/``write`` take that same root).
        param: ``"weight"`` for Linear/Conv1D, ``"gate_up_proj"`` / ``"down_proj"`` for experts.
        expert: index into the fused 3-D expert parameter, or None.
        transposed: the parameter stores ``[in, out]`` (GPT-2 ``Conv1D``).
        shape: ``(out, in)`` of the math weight.
    """

    name: str
    module: str
    param: str
    expert: int | None
    transposed: bool
    shape: tuple[int, int]

    @property
    def kind(self) -> str:
        """``"expert"``, ``"conv1d"`` or ``"linear"``."""
        return "expert" if self.expert is not None else "conv1d" if self.transposed else "linear"

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def tensor_name(self) -> str:
        """State-dict key (relative to the root) of the stored tensor (the whole 3-D one for experts)."""
        return f"{self.module}.{self.param}" if self.module else self.param

    def read(self, root: nn.Module) -> torch.Tensor:
        """The weight ``[out, in]`` as a detached VIEW of the stored parameter (clone before editing)."""
        holder = root.get_submodule(self.module) if self.module else root
        tensor = getattr(holder, self.param).detach()
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor.T if self.transposed else tensor

    def write(self, root: nn.Module, weight: torch.Tensor) -> None:
        """Store ``weight [out, in]`` back in place, in the storage orientation, dtype and device.

        Raises:
            ShapeMismatch: ``weight`` is not ``[out, in]`` (names the unit).
        """
        target = self.read(root)
        if tuple(weight.shape) != self.shape:
            raise ShapeMismatch(list(self.shape), list(weight.shape), name=self.name,
                                reason="a unit's weight is written in the math orientation [out, in]")
        with torch.no_grad():
            target.copy_(weight.detach())  # the view writes through; copy_ casts dtype and device


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` if transformers is imported (no model can hold one otherwise)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _fused_params(module: nn.Module) -> list[str]:
    """Names of the 3-D parameters of a fused-experts module (``[]`` for any other module)."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    expert_like = hasattr(module, "num_experts") or any(n in EXPERT_PARAMS for n in names)
    return names if expert_like else []


def _expert_problem(module: nn.Module) -> str | None:
    """Why a module holding 3-D parameters is not a supported fused-experts module (None: it is)."""
    names = _fused_params(module)
    if sorted(names) != sorted(EXPERT_PARAMS):
        return f"3-D parameters {names}; supported fused experts hold exactly {list(EXPERT_PARAMS)}"
    bad = {k: getattr(module, k) for k, ok in _EXPERT_LAYOUT.items() if getattr(module, k, ok) != ok}
    if bad:
        return f"fused experts with layout {bad} (supported: {_EXPERT_LAYOUT})"
    gate_up, down = module.gate_up_proj, module.down_proj
    experts, two_ffn, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_ffn // 2) or two_ffn % 2:
        return f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} are not [E, 2F, H] / [E, H, F]"
    if not callable(getattr(module, "act_fn", None)):
        return "fused experts without an act_fn"
    return None


def _module_units(path: str, module: nn.Module, name_prefix: str, module_prefix: str) -> list[PrunableUnit]:
    """The units held directly by one module (``path`` relative to the scanned block)."""
    name, where = f"{name_prefix}{path}", f"{module_prefix}{path}"
    if isinstance(module, nn.Linear):
        return [PrunableUnit(name, where, "weight", None, False, tuple(module.weight.shape))]
    conv = conv1d_class()
    if conv is not None and isinstance(module, conv):
        n_in, n_out = module.weight.shape
        return [PrunableUnit(name, where, "weight", None, True, (n_out, n_in))]
    if not _fused_params(module) or _expert_problem(module) is not None:
        return []
    return [PrunableUnit(f"{name}.{param}.{e}", where, param, e, False, tuple(tensor.shape[1:]))
            for param in EXPERT_PARAMS
            for tensor in [getattr(module, param)]
            for e in range(tensor.shape[0])]


def matrix_units(module: nn.Module, *, prefix: str = "") -> list[PrunableUnit]:
    """Every Linear, Conv1D and fused-experts unit under ``module``, with no exclusions and no checks.

    The LM head and Linear routers are included: statistics collection may hook them (e.g. for
    the head's reconstruction error); pruning selects with :func:`prunable_units`.
    """
    return [u for path, m in module.named_modules() for u in _module_units(path, m, prefix, "")]


def _never_units(root: nn.Module) -> set[int]:
    """ids of modules that are never units: output head(s), Linears tied to embeddings, routers."""
    get_out = getattr(root, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    embedded = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    excluded = {id(head)} if head is not None else set()
    for path, module in root.named_modules():
        parent_path, _, last = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        is_router = last in ROUTER_NAMES and isinstance(getattr(parent, "experts", None), nn.Module)
        tied = isinstance(getattr(module, "weight", None), nn.Parameter) and id(module.weight) in embedded
        if is_router or last == "lm_head" or (tied and not isinstance(module, nn.Embedding)):
            excluded.add(id(module))
    return excluded


def _scan(root: nn.Module, scanned: nn.Module, name_prefix: str, module_prefix: str,
          block: str) -> list[PrunableUnit]:
    """Units of ``scanned`` (``root`` itself or one decoder block); raise on an unmapped weight."""
    excluded = _never_units(scanned)
    units: list[PrunableUnit] = []
    for path, module in scanned.named_modules():
        if id(module) in excluded:
            continue
        if _fused_params(module) and (problem := _expert_problem(module)) is not None:
            raise UnsupportedArchitecture(type(root).__name__, problem, block=block,
                                          pattern=f"{path}: {type(module).__name__}")
        found = _module_units(path, module, name_prefix, module_prefix)
        covered = {u.param for u in found}
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and pname not in covered and not isinstance(module, nn.Embedding):
                raise UnsupportedArchitecture(
                    type(root).__name__, "a weight that is neither a prunable unit (Linear, Conv1D, fused "
                    "experts) nor a known non-prunable part (norm, bias, embedding, router, head)", block=block,
                    pattern=f"{path}.{pname}: {type(module).__name__} parameter {list(p.shape)}")
        units.extend(found)
    return units


def prunable_units(module: nn.Module, *, prefix: str = "") -> list[PrunableUnit]:
    """The prunable units of ``module`` in module order (see the module docstring for the rules).

    Args:
        module: a whole causal LM (only its decoder blocks are scanned), one decoder block, or
            any torch module without decoder blocks (all of it is scanned).
        prefix: prepended to unit names (e.g. ``"model.layers.3."`` for block 3 scanned alone,
            so names match those of the whole model); ``module`` paths stay relative to ``module``.

    Returns:
        A list of :class:`PrunableUnit`; empty when nothing is prunable.

    Raises:
        UnsupportedArchitecture: a parameter with two or more dimensions that is not a unit or a
            known non-prunable part (names the model class, the block and the module pattern).
    """
    try:
        path, blocks = decoder_blocks(module)
    except UnsupportedArchitecture:
        return _scan(module, module, prefix, "", prefix.rstrip("."))
    units: list[PrunableUnit] = []
    for i, block in enumerate(blocks):
        where = f"{path}.{i}."
        units.extend(_scan(module, block, f"{prefix}{where}", where, f"{prefix}{path}.{i}"))
    return units


__all__ = ["EXPERT_PARAMS", "ROUTER_NAMES", "PrunableUnit", "conv1d_class", "matrix_units", "prunable_units"]
