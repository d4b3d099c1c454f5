"""The one-shot job's config (``job: oneshot``): method, sparsity pattern and scope, calibration
mode, evaluation, SparseGPT's solver options and the optional sparse export.

Imports neither Prefect nor MLflow (``prune validate`` stays light).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flows.config import CalibrationConfig, EvaluationConfig, LLMJob, PositiveInt, StrictModel
from flows.oneshot.quality import AllocationSection, RecoverySection, check_allocation
from pruning_core.masks import MaskScope
from pruning_core.masks.pattern import NM, SparsityPattern, Unstructured
from pruning_core.methods import METHODS


class OneShotCalibration(CalibrationConfig):
    """The shared calibration windows, and how the statistics are collected."""

    mode: Literal["one_pass", "sequential"] = Field(
        "one_pass",
        description="one_pass: statistics of the dense model; sequential: prune block i, then feed block i+1 "
        "with the pruned block's outputs (the Wanda/SparseGPT reference procedure)",
    )


class OneShotEvaluation(EvaluationConfig):
    """The shared held-out perplexity and speed, and where per-layer reconstruction errors are measured."""

    error_windows: PositiveInt = Field(
        8, description="calibration windows on which each layer's output reconstruction error is measured"
    )


class SparseGPTConfig(StrictModel):
    blocksize: PositiveInt = 128
    percdamp: float = Field(0.01, gt=0, le=1)


class ExportConfig(StrictModel):
    """Optional sparse export of the pruned weights to ``<output dir>/sparse/``."""

    sparse_format: Literal["none", "csr", "semi_structured", "compressed_tensors"] = Field(
        "none",
        description="csr (any pattern), semi_structured (2:4: values + 2-bit indices) or compressed_tensors "
        "(2:4: compressed-tensors' sparse-24-bitmask Hugging Face layout)",
    )


class QuantizationConfig(StrictModel):
    """Optional weight-only quantization (W4A16 / W8A16) of the pruned weights.

    ``joint`` (the default where possible): in the prune step itself, on the Hessians of the
    pruning calibration: SparseGPT + GPTQ in one OBS pass (SparseGPT §3.5), other methods' masks
    then GPTQ with the mask kept (:func:`pruning_core.pruning.prune_and_quantize`); no second
    calibration pass. ``joint: false``: a separate pass after pruning (and recovery) over the pruned
    checkpoint, each block's Hessians from the already quantized previous blocks (GPTQ's sequential
    procedure). Either way the pruning mask is kept exactly and the output is ``model-quantized/``
    in compressed-tensors' ``pack-quantized`` format.
    """

    bits: Literal[4, 8] = 4
    group_size: int = Field(128, description="inputs per scale group; -1: one scale per output channel. Must "
                                             "divide every layer's input size (SmolLM2's 576: use 64)")
    symmetric: bool = True
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq (OBS error compensation) or rtn "
                                                               "(round to nearest, the baseline)")
    percdamp: float = Field(0.01, gt=0, le=1, description="GPTQ's relative Hessian dampening (joint SparseGPT "
                                                          "uses sparsegpt.percdamp)")
    joint: bool | None = Field(None, description="quantize in the prune step on the pruning calibration's "
                                                 "Hessians (default: yes, unless recovery or scope global "
                                                 "needs the separate pass); false: a separate pass after pruning")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError(f"group_size: a positive number of inputs or -1 (per channel), got {v}")
        return v


class OneShotJob(LLMJob):
    """One-shot unstructured or N:M pruning of a causal LM with a registered method
    (:data:`pruning_core.methods.METHODS`: magnitude, Wanda, SparseGPT, and any method added there)."""

    job: Literal["oneshot"] = "oneshot"
    method: str = Field(description="a registered method (pruning_core.methods.METHODS)")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction pruned, in [0, 1); implied by N:M")
    pattern: str = Field("unstructured", description="unstructured, N:M (e.g. 2:4), block:HxW, row or column")
    scope: Literal["layer", "row", "global"] | None = Field(
        None, description="comparison group for unstructured masks; default row for wanda, layer otherwise"
    )
    calibration: OneShotCalibration = Field(default_factory=OneShotCalibration)
    evaluation: OneShotEvaluation = Field(default_factory=OneShotEvaluation)
    sparsegpt: SparseGPTConfig = Field(default_factory=SparseGPTConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    allocation: AllocationSection = Field(default_factory=AllocationSection)
    recovery: RecoverySection | None = Field(None, description="fixed-mask distillation after pruning (absent: none)")
    quantization: QuantizationConfig | None = Field(
        None, description="weight-only quantization after pruning (absent: none); for quantization alone use "
                          "method magnitude with sparsity 0")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; registered: {', '.join(repr(m) for m in METHODS)}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            return str(SparsityPattern.parse(v))
        except Exception as e:  # InvalidPattern -> pydantic error naming the field
            raise ValueError(str(e)) from e

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> OneShotJob:
        pattern = self.sparsity_pattern
        implied = pattern.theoretical_sparsity()
        if isinstance(pattern, NM):
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity: pattern {pattern} fixes it at {implied}; got {self.sparsity}")
        elif self.sparsity is None:
            raise ValueError(f"sparsity: required for pattern {pattern} (a fraction in [0, 1))")
        if self.scope is not None and not isinstance(pattern, Unstructured):
            raise ValueError(f"scope: applies to unstructured masks only, not pattern {pattern}")
        method = METHODS[self.method]
        if not method.structured_patterns and not isinstance(pattern, Unstructured | NM):
            raise ValueError(f"pattern: {self.method} supports unstructured and N:M patterns, not {pattern}")
        if self.scope is not None and MaskScope(self.scope) not in method.scopes:
            allowed = ", ".join(sorted(s.value for s in method.scopes))
            raise ValueError(f"scope: {self.method} does not support scope {self.scope} (allowed: {allowed})")
        if self.scope == "global" and self.calibration.mode == "sequential":
            raise ValueError("scope: global needs every layer's scores at once; use calibration mode one_pass")
        fmt = self.export.sparse_format
        if fmt in ("semi_structured", "compressed_tensors") and str(pattern) != "2:4":
            raise ValueError(f"export.sparse_format: {fmt} stores 2:4 sparsity only; pattern is {pattern} "
                             "(use pattern 2:4, or sparse_format csr or none)")
        check_allocation(self.allocation, unstructured=isinstance(pattern, Unstructured), scope=self.mask_scope,
                         sparsity=self.target_sparsity, calibration_windows=self.calibration.num_windows)
        check_joint_quantization(self)
        if self.recovery is not None and self.calibration.text == self.evaluation.text:
            raise ValueError(f"recovery: trains on the calibration text, which must differ from the evaluation "
                             f"text (both {self.calibration.text!r})")
        return self

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        implied = self.sparsity_pattern.theoretical_sparsity()
        return float(self.sparsity if self.sparsity is not None else implied)

    @property
    def mask_scope(self) -> str:
        return self.scope or METHODS[self.method].default_scope.value

    @property
    def joint_quantization(self) -> bool:
        """Whether quantization runs in the prune step (see :class:`QuantizationConfig`)."""
        q = self.quantization
        if q is None:
            return False
        return q.joint if q.joint is not None else not _separate_pass_reasons(self)


def _separate_pass_reasons(job: OneShotJob) -> list[str]:
    """What makes a joint quantization impossible: recovery retrains the weights after pruning (it
    would undo the quantization), a global scope chooses the masks after every layer is scored."""
    reasons = []
    if job.recovery is not None:
        reasons.append("recovery retrains the pruned weights, which would undo the quantization")
    if job.mask_scope == "global":
        reasons.append("scope global chooses the masks once every layer is scored")
    return reasons


def check_joint_quantization(job: OneShotJob) -> None:
    """ValueError for a ``quantization.joint`` that cannot be (names the fields and a way out)."""
    q = job.quantization
    if q is None or q.joint is False:
        return
    reasons = _separate_pass_reasons(job)
    if q.joint and reasons:
        raise ValueError(f"quantization.joint: {reasons[0]}; use joint: false (quantize in a separate pass)")
    blocksize = job.sparsegpt.blocksize
    if job.method == "sparsegpt" and q.method == "gptq" and not reasons and q.group_size != -1 \
            and blocksize % q.group_size:
        raise ValueError(f"quantization.group_size: joint SparseGPT + GPTQ needs sparsegpt.blocksize ({blocksize}) "
                         f"to be a multiple of it ({q.group_size}); set sparsegpt.blocksize: "
                         f"{q.group_size * -(-blocksize // q.group_size)} or quantization.joint: false")

