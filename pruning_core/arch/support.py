"""Which jobs support which model families, checked from a model or from its config alone.

Stage: foundation. :data:`FAMILIES` is the table of tested families (``config.model_type`` ->
family): every one of them supports one-shot pruning (magnitude, Wanda, SparseGPT; unstructured
and N:M); Minitron depth/width supports the Llama-like ones. :func:`architecture_support` decides
from the model's real structure: one-shot works on any decoder-only model whose decoder blocks
map completely onto prunable units (:func:`~pruning_core.arch.units.prunable_units`), so a family
outside the table is accepted with a warning when it maps, and refused with
:class:`UnsupportedArchitecture` naming the block and module pattern when it does not. From a
config, the structure comes from a skeleton built on the ``meta`` device (no memory, no weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pruning_core.arch.layout import MODEL_BUILD_LOCK, decoder_blocks
from pruning_core.arch.units import prunable_units
from pruning_core.errors import ConfigError, UnsupportedArchitecture

logger = logging.getLogger(__name__)

Job = Literal["oneshot", "minitron"]


@dataclass(frozen=True)
class Family:
    """A tested model family: its name and whether Minitron depth/width supports it."""

    name: str
    minitron: bool


_LLAMA_LIKE = {"llama": "Llama 2/3", "mistral": "Mistral", "qwen2": "Qwen2/2.5", "qwen3": "Qwen3",
               "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3"}
_OTHERS = {"phi": "Phi-1/2", "olmo": "OLMo", "stablelm": "StableLM", "falcon": "Falcon",
           "gpt_neox": "GPT-NeoX", "opt": "OPT", "gpt2": "GPT-2", "mixtral": "Mixtral",
           "qwen2_moe": "Qwen2-MoE"}
# config.model_type -> family. Each entry is covered by tests/tiny_models.py (fp32 and bf16).
FAMILIES: dict[str, Family] = {**{t: Family(n, True) for t, n in _LLAMA_LIKE.items()},
                               **{t: Family(n, False) for t, n in _OTHERS.items()}}


@dataclass(frozen=True)
class ArchitectureSupport:
    """What the pipeline can do with one model.

    Attributes:
        model_class: e.g. ``"MixtralForCausalLM"``.
        model_type: ``config.model_type`` (None for a plain torch module).
        family: the tested family, or None (outside :data:`FAMILIES`).
        oneshot: one-shot pruning is possible (the decoder blocks map onto prunable units).
        minitron: Minitron depth/width is possible (a Llama-like family that maps).
        errors: the error each unsupported job raises (``{"minitron": UnsupportedArchitecture}``).
    """

    model_class: str
    model_type: str | None
    family: Family | None
    oneshot: bool
    minitron: bool
    errors: dict[str, UnsupportedArchitecture] = field(default_factory=dict, compare=False)

    @property
    def tested(self) -> bool:
        return self.family is not None


def meta_model(config: Any) -> nn.Module:
    """A causal-LM skeleton of ``config`` on the ``meta`` device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with MODEL_BUILD_LOCK, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _oneshot_error(model: nn.Module) -> UnsupportedArchitecture | None:
    try:
        decoder_blocks(model)
        if not prunable_units(model):
            raise UnsupportedArchitecture(type(model).__name__, "no prunable weight in the decoder blocks")
    except UnsupportedArchitecture as exc:
        return exc
    return None


def _minitron_error(model: nn.Module, family: Family | None) -> UnsupportedArchitecture:
    path, blocks = decoder_blocks(model)
    pattern = ", ".join(dict.fromkeys(u.module for u in prunable_units(blocks[0])))
    supported = ", ".join(f.name for f in FAMILIES.values() if f.minitron)
    what = family.name if family is not None else "this family"
    return UnsupportedArchitecture(type(model).__name__, f"Minitron depth/width maps only Llama-like blocks "
                                   f"({supported}), not {what}", block=f"{path}.0", pattern=pattern)


def architecture_support(model_or_config: nn.Module | Any) -> ArchitectureSupport:
    """Which jobs support ``model_or_config`` (a model, or a transformers config: no weights read)."""
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(model_or_config)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if model_type is not None else None
    errors: dict[str, UnsupportedArchitecture] = {}
    oneshot_error = _oneshot_error(model)
    if oneshot_error is not None:
        errors["oneshot"] = errors["minitron"] = oneshot_error
    elif family is None or not family.minitron:
        errors["minitron"] = _minitron_error(model, family)
    return ArchitectureSupport(type(model).__name__, model_type, family, "oneshot" not in errors,
                               "minitron" not in errors, errors)


def require_architecture(model_or_config: nn.Module | Any, job: Job) -> ArchitectureSupport:
    """:func:`architecture_support`, raising when ``job`` is not supported (call it before long work).

    A family outside :data:`FAMILIES` whose blocks map is accepted for one-shot with a warning.

    Raises:
        UnsupportedArchitecture: names the model class, the block and the module pattern.
        ConfigError: an unknown ``job``.
    """
    if job not in ("oneshot", "minitron"):
        raise ConfigError("job", f"unknown job {job!r}; architecture support is known for 'oneshot', 'minitron'")
    support = architecture_support(model_or_config)
    if job in support.errors:
        raise support.errors[job]
    if not support.tested:
        logger.warning("%s (model_type %r) is not among the tested families %s; its decoder blocks map onto "
                       "prunable units, so %s proceeds", support.model_class, support.model_type,
                       sorted(FAMILIES), job)
    return support


__all__ = ["FAMILIES", "ArchitectureSupport", "Family", "Job", "architecture_support", "meta_model",
           "require_architecture"]
