"""Typed errors raised deliberately by pruning_core (and by the flows on top of it).

Every error names the object it is about (a layer name, a file, a config field) and the
numbers involved. Errors caused by bad input also subclass ``ValueError`` so callers that
catch ``ValueError`` keep working. (Origin of the names: :mod:`pruning_core.compat`.)
"""

from __future__ import annotations

from collections.abc import Sequence


def _where(layer: str | None) -> str:
    return f" (layer '{layer}')" if layer else ""


class PruningError(Exception):
    """Base class for every error raised deliberately by pruning_core."""


class NumericalInstability(PruningError, ValueError):
    """NaN/Inf in weights, activations, gradients or scores, or a factorization that fails."""

    def __init__(
        self,
        method: str,
        details: str,
        *,
        layer: str | None = None,
        index: tuple[int, ...] | None = None,
    ) -> None:
        self.method = method
        self.details = details
        self.layer = layer
        self.index = index
        super().__init__(f"Numerical instability in {method}{_where(layer)}: {details}")


class CalibrationRequired(PruningError, ValueError):
    """A method that needs calibration data was called without it."""

    def __init__(self, method: str, *, layer: str | None = None) -> None:
        self.method = method
        self.layer = layer
        super().__init__(
            f"Method '{method}' requires calibration data but none was provided{_where(layer)}"
        )


class ShapeMismatch(PruningError, ValueError):
    """Two shapes that must agree do not, or a tensor has the wrong rank."""

    def __init__(
        self,
        expected: Sequence[int] | str,
        got: Sequence[int],
        *,
        name: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.expected = expected if isinstance(expected, str) else list(expected)
        self.got = list(got)
        self.name = name
        self.reason = reason
        subject = f"'{name}': " if name else ""
        why = f" ({reason})" if reason else ""
        super().__init__(f"Shape mismatch: {subject}expected {self.expected}, got {self.got}{why}")


class InvalidMask(PruningError, ValueError):
    """A mask is not boolean, has the wrong shape or density, or breaks monotonicity."""

    def __init__(self, reason: str, *, name: str | None = None) -> None:
        self.reason = reason
        self.name = name
        subject = f" for '{name}'" if name else ""
        super().__init__(f"Invalid sparsity mask{subject}: {reason}")


class InvalidPattern(PruningError, ValueError):
    """A sparsity pattern is malformed (N:M with m=0, a zero block) or does not fit a tensor."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        self.message = message
        self.name = name
        subject = f" for '{name}'" if name else ""
        super().__init__(f"Invalid sparsity pattern{subject}: {message}")


class MissingActivationStats(PruningError, ValueError):
    """The calibration context has no statistics for a layer that needs them."""

    def __init__(self, layer: str, *, available: Sequence[str] = ()) -> None:
        self.layer = layer
        self.available = list(available)
        hint = ""
        if self.available:
            shown = ", ".join(self.available[:5])
            more = f", ... ({len(self.available)} in all)" if len(self.available) > 5 else ""
            hint = f"; layers with statistics: {shown}{more}"
        super().__init__(f"Missing activation statistics for layer '{layer}'{hint}")


class InvalidSparsity(PruningError, ValueError):
    """A sparsity (or another fraction or count) is outside its allowed range."""

    def __init__(self, value: float, constraint: str, *, name: str | None = None) -> None:
        self.value = value
        self.constraint = constraint
        self.name = name
        subject = f" for '{name}'" if name else ""
        super().__init__(f"Invalid sparsity value {value}{subject}: {constraint}")


class NoParameters(PruningError, ValueError):
    """A module (or a model, after filtering) has nothing to prune."""

    def __init__(self, module: str) -> None:
        self.module = module
        super().__init__(f"Module '{module}' has no parameters to prune")


class ConfigError(PruningError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"Invalid config field '{field}': {message}")


class UnsupportedOperation(PruningError, NotImplementedError):
    """The operation exists, but not for this input's device, dtype or layout (the message says
    which, and what to use instead)."""


class GraphError(PruningError, ValueError):
    """A dependency graph or a structured pruning plan is inconsistent with the model."""


class UnsupportedArchitecture(ConfigError, GraphError):
    """A model whose structure the pipeline cannot map: no decoder blocks where any supported
    family keeps them, a weight inside a block that is neither a prunable unit nor a known
    non-prunable part, or a job (e.g. Minitron) that does not support the family.

    A :class:`ConfigError` (field ``"model"``: the wrong model was configured) and a
    :class:`GraphError` (the structure does not map), so callers catching either keep working.

    Attributes:
        model_class: the model's class name (``"GPT2LMHeadModel"``).
        block: the decoder block (or other module path) where mapping failed, or ``""``.
        pattern: the module pattern that could not be mapped (``"mlp.experts.down_proj:
            FooExperts parameter [4, 64, 128]"``), or ``""``.
        reason: what is unsupported and what would be needed.
    """

    def __init__(self, model_class: str, reason: str, *, block: str = "", pattern: str = "") -> None:
        self.model_class = model_class
        self.block = block
        self.pattern = pattern
        self.reason = reason
        where = f" in block '{block}'" if block else ""
        what = f" at '{pattern}'" if pattern else ""
        super().__init__("model", f"{model_class}{where}{what}: {reason}")


class ArtifactError(PruningError):
    """An artifact (model, statistics, mask, ticket) is missing, corrupt or fails its checksum."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Artifact '{self.path}': {reason}")


class ServiceUnavailable(PruningError):
    """A server the pipeline depends on (MLflow, Prefect, Dask) could not be reached."""

    def __init__(self, service: str, address: str, reason: str) -> None:
        self.service = service
        self.address = address
        self.reason = reason
        super().__init__(f"{service} at {address} is unavailable: {reason}")


__all__ = [
    "ArtifactError",
    "CalibrationRequired",
    "ConfigError",
    "GraphError",
    "InvalidMask",
    "InvalidPattern",
    "InvalidSparsity",
    "MissingActivationStats",
    "NoParameters",
    "NumericalInstability",
    "PruningError",
    "ServiceUnavailable",
    "UnsupportedArchitecture",
    "UnsupportedOperation",
    "ShapeMismatch",
]
