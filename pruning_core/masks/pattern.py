"""Sparsity patterns (which shapes of zeros are allowed) and mask comparison scopes.

Stage: masks. A pattern is a small frozen value object. Construction accepts any non-negative
integers so that :meth:`SparsityPattern.is_valid` can answer for malformed ones; every use of a
pattern (``check``, ``validate`` and the mask generators) raises
:class:`~pruning_core.errors.InvalidPattern` for a malformed one instead of dividing by zero.
:meth:`SparsityPattern.check_prunable` (used by :meth:`SparsityPattern.parse` and
:class:`~pruning_core.masks.spec.SparsitySpec`) is stricter: an N:M pattern must keep at least
one and prune at least one element per group (``1 <= N < M``).

Masks are boolean tensors where ``True`` means *keep*.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from pruning_core.errors import InvalidPattern, ShapeMismatch


class MaskScope(enum.Enum):
    """Which scores compete with each other for an unstructured mask.

    LAYER: one threshold per layer (weight tensor). ROW: one per output row, as Wanda does.
    GLOBAL: one threshold across all targeted layers.
    """

    LAYER = "layer"
    ROW = "row"
    GLOBAL = "global"


class SparsityPattern:
    """Base of the five patterns: ``SparsityPattern.Unstructured()``, ``.NM(n, m)``,
    ``.Block(height, width)``, ``.Row()``, ``.Column()``."""

    # Filled in below with the concrete classes: ``SparsityPattern.NM(2, 4)`` also works.
    Unstructured: type[Unstructured]
    NM: type[NM]
    Block: type[Block]
    Row: type[Row]
    Column: type[Column]

    def problem(self) -> str | None:
        """Why this pattern is malformed, or None if it is well formed."""
        return None

    def is_valid(self) -> bool:
        """True if the pattern's parameters are well formed (NM: 0 <= n <= m, m > 0; Block: h, w > 0)."""
        return self.problem() is None

    def check(self) -> None:
        """Raise :class:`InvalidPattern` if the pattern is malformed."""
        reason = self.problem()
        if reason is not None:
            raise InvalidPattern(reason)

    def check_prunable(self) -> None:
        """Raise :class:`InvalidPattern` unless pruning with this pattern is meaningful: well formed,
        and (N:M) keeping at least one and pruning at least one element per group, ``1 <= N < M``.

        ``0:M`` would prune every weight; ``M:M`` would prune none.
        """
        self.check()

    def theoretical_sparsity(self) -> float | None:
        """The sparsity the pattern itself implies (N:M: 1 - n/m), or None if it depends on a target."""
        return None

    def check_shape(self, shape: tuple[int, ...] | torch.Size, *, name: str | None = None) -> None:
        """Raise :class:`InvalidPattern` (or :class:`ShapeMismatch`) unless a weight of ``shape`` can
        carry this pattern (N:M: last dim divisible by M; Block: 2-D, divisible; Row/Column: 2-D).

        This is the cheap check a job runs on every targeted layer before any long work.
        """
        self.validate(torch.zeros(tuple(shape), dtype=torch.bool), name=name)

    def validate(self, mask: torch.Tensor, *, name: str | None = None) -> None:
        """Raise :class:`InvalidPattern` (or :class:`ShapeMismatch`) unless ``mask`` follows the pattern."""
        self.check()

    @staticmethod
    def parse(text: str) -> SparsityPattern:
        """Parse ``unstructured``, ``row``, ``column``, ``N:M`` (e.g. ``2:4``) or ``block:HxW``.

        Raises:
            InvalidPattern: unparseable text, a malformed pattern, or an N:M pattern outside
                ``1 <= N < M`` (``0:4`` would prune everything, ``4:4`` nothing).
        """
        t = text.strip().lower()
        if t == "unstructured":
            return Unstructured()
        if t == "row":
            return Row()
        if t == "column":
            return Column()
        if m := re.fullmatch(r"(\d+):(\d+)", t):
            pattern: SparsityPattern = NM(int(m.group(1)), int(m.group(2)))
        elif m := re.fullmatch(r"block:(\d+)x(\d+)", t):
            pattern = Block(int(m.group(1)), int(m.group(2)))
        else:
            raise InvalidPattern(
                f"cannot parse {text!r}; expected one of: unstructured, row, column, N:M (e.g. 2:4), block:HxW"
            )
        pattern.check_prunable()
        return pattern


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidPattern(f"{name} must be a non-negative integer, got {value!r}")


def _require_2d(pattern: str, mask: torch.Tensor, name: str | None) -> None:
    if mask.dim() != 2:
        raise ShapeMismatch(
            "a 2-D mask", list(mask.shape), name=name, reason=f"{pattern} pattern requires a 2D tensor, got {mask.dim()}D"
        )


@dataclass(frozen=True)
class Unstructured(SparsityPattern):
    """Any element may be pruned."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM(SparsityPattern):
    """At most ``n`` kept in every group of ``m`` consecutive elements along the last (input) dim."""

    n: int
    m: int

    def __post_init__(self) -> None:
        _check_int("n", self.n)
        _check_int("m", self.m)

    def problem(self) -> str | None:
        if self.m == 0:
            return "M must be > 0"
        if self.n > self.m:
            return f"N ({self.n}) must be <= M ({self.m})"
        return None

    def check_prunable(self) -> None:
        self.check()
        if self.n == 0:
            raise InvalidPattern(f"N:M = {self} keeps no weight of a group: it would prune everything "
                                 f"(N:M needs 1 <= N < M)")
        if self.n == self.m:
            raise InvalidPattern(f"N:M = {self} keeps every weight of a group: it would prune nothing "
                                 f"(N:M needs 1 <= N < M)")

    def theoretical_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.m else None

    def validate(self, mask: torch.Tensor, *, name: str | None = None) -> None:
        self.check()
        width = mask.shape[-1] if mask.dim() else 1
        if mask.dim() == 0 or width % self.m:
            raise InvalidPattern(f"last dimension {width} is not divisible by M={self.m}", name=name)
        keep = mask if mask.dtype == torch.bool else mask > 0.5
        kept = keep.reshape(-1, self.m).sum(dim=1)
        over = torch.nonzero(kept > self.n)
        if over.numel():
            g = int(over[0, 0])
            per_row = max(width // self.m, 1)
            first = g % per_row * self.m
            raise InvalidPattern(
                f"group {g} (row {g // per_row}, columns {first}..{first + self.m - 1})"
                f" has {int(kept[g])} kept elements, expected at most {self.n} (N:M = {self.n}:{self.m})",
                name=name,
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block(SparsityPattern):
    """Whole ``height x width`` tiles of a 2-D weight are kept or pruned together."""

    height: int
    width: int

    def __post_init__(self) -> None:
        _check_int("height", self.height)
        _check_int("width", self.width)

    def problem(self) -> str | None:
        if self.height == 0 or self.width == 0:
            return f"block size must be positive, got {self.height}x{self.width}"
        return None

    def validate(self, mask: torch.Tensor, *, name: str | None = None) -> None:
        self.check()
        _require_2d("Block", mask, name)
        rows, cols = mask.shape
        if rows % self.height or cols % self.width:
            raise InvalidPattern(
                f"shape {rows}x{cols} is not divisible by the {self.height}x{self.width} block", name=name
            )
        if mask.numel() == 0:
            return
        tiles = mask.reshape(rows // self.height, self.height, cols // self.width, self.width)
        uniform = (tiles.amax(dim=(1, 3)) == tiles.amin(dim=(1, 3)))
        if not bool(uniform.all()):
            r, c = (int(i) for i in torch.nonzero(~uniform)[0])
            raise InvalidPattern(f"block ({r}, {c}) is not uniform", name=name)

    def __str__(self) -> str:
        return f"block:{self.height}x{self.width}"


@dataclass(frozen=True)
class Row(SparsityPattern):
    """Whole output rows (neurons) are kept or pruned."""

    def validate(self, mask: torch.Tensor, *, name: str | None = None) -> None:
        _require_2d("Row", mask, name)
        if mask.numel() == 0:
            return
        uniform = mask.amax(dim=1) == mask.amin(dim=1)
        if not bool(uniform.all()):
            raise InvalidPattern(f"row {int(torch.nonzero(~uniform)[0, 0])} is not uniform", name=name)

    def __str__(self) -> str:
        return "row"


@dataclass(frozen=True)
class Column(SparsityPattern):
    """Whole input columns (features) are kept or pruned."""

    def validate(self, mask: torch.Tensor, *, name: str | None = None) -> None:
        _require_2d("Column", mask, name)
        if mask.numel() == 0:
            return
        uniform = mask.amax(dim=0) == mask.amin(dim=0)
        if not bool(uniform.all()):
            raise InvalidPattern(f"column {int(torch.nonzero(~uniform)[0, 0])} is not uniform", name=name)

    def __str__(self) -> str:
        return "column"


SparsityPattern.Unstructured = Unstructured
SparsityPattern.NM = NM
SparsityPattern.Block = Block
SparsityPattern.Row = Row
SparsityPattern.Column = Column

__all__ = ["NM", "Block", "Column", "MaskScope", "Row", "SparsityPattern", "Unstructured"]
