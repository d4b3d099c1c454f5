"""The hidden states of every calibration/evaluation batch at one depth, in memory or on disk.

Stage: streaming (used by :mod:`pruning_core.lm.stream`). A block-by-block pass keeps the
activations of all windows at the current depth, e.g. 64 x 256 x 4096 x 4 bytes = 268 MB for a
7 B model in float32. When that does not fit, :class:`Activations` spills each batch to its own
safetensors file in a scratch directory and reads it back when the batch is used, so memory holds
one batch at a time.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_counter = itertools.count()


class Activations:
    """Per-batch tensors ``[b, T, D]`` of one depth, appended in batch order.

    Args:
        spill_dir: None keeps every tensor in memory (on the CPU when ``offload``); a directory
            receives the batches that do not fit in ``budget`` as
            ``<spill_dir>/act-<id>-<batch>.safetensors``.
        budget: bytes kept in memory before spilling (None: spill every batch when ``spill_dir``
            is given).
        offload: keep in-memory tensors on the CPU even if they were computed on an accelerator.
    """

    def __init__(self, spill_dir: str | os.PathLike[str] | None = None, *, budget: int | None = None,
                 offload: bool = True) -> None:
        self._dir = Path(spill_dir) if spill_dir is not None else None
        self._budget = budget
        self._offload = offload
        self._tag = f"{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
        self._items: list[torch.Tensor | Path] = []
        self.nbytes = 0

    @property
    def spilled(self) -> int:
        """How many batches live on disk."""
        return sum(isinstance(item, Path) for item in self._items)

    def append(self, tensor: torch.Tensor) -> None:
        """Store the next batch's tensor (detached; copied to the CPU when spilled or offloaded)."""
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        fits = self._budget is not None and self.nbytes + size <= self._budget
        self.nbytes += size
        if self._dir is None or fits:
            self._items.append(tensor.cpu() if self._offload else tensor)
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"act-{self._tag}-{len(self._items):05d}.safetensors"
        save_file({"h": tensor.cpu().contiguous()}, str(path))
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        return load_file(str(item))["h"] if isinstance(item, Path) else item

    def release(self) -> None:
        """Drop every batch (and delete the spill files)."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items.clear()
        self.nbytes = 0


__all__ = ["Activations"]
