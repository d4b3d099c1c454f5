"""A toy method, as a user would add one: this file plus one line in the registry.

It keeps the *smallest* magnitudes (the opposite of magnitude pruning), so its masks are easy to
tell apart from every registered method's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning_core.methods.base import BaseMethod


@dataclass(frozen=True)
class SmallestFirst(BaseMethod):
    """Option: ``offset`` added to |w| before inverting (any positive number)."""

    name: ClassVar[str] = "smallest_first"

    offset: float = 1.0

    def score(self, weight: torch.Tensor, stats=None, *, name=None) -> torch.Tensor:
        return 1.0 / (self.offset + weight.detach().float().abs())
