"""Every on-disk name of the Lottery Ticket state, in one place (open_lth's ``foundations/paths``).

Layout of a search directory::

    <root>/round_000/ticket.safetensors   masks, rewind and trained weights after round 0
    <root>/round_000/ticket.json          round records, config, checksum (written last: the commit mark)
    <root>/round_001/...
"""

from __future__ import annotations

import re
from pathlib import Path

TENSORS_FILE = "ticket.safetensors"
META_FILE = "ticket.json"
_ROUND_DIR = re.compile(r"round_(\d{3,})")


def round_dir(root: str | Path, round_index: int) -> Path:
    return Path(root) / f"round_{round_index:03d}"


def tensors_file(directory: str | Path) -> Path:
    return Path(directory) / TENSORS_FILE


def meta_file(directory: str | Path) -> Path:
    return Path(directory) / META_FILE


def round_of(directory: str | Path) -> int | None:
    """The round index of a ``round_NNN`` directory name, or None for any other name."""
    m = _ROUND_DIR.fullmatch(Path(directory).name)
    return int(m.group(1)) if m else None


__all__ = ["META_FILE", "TENSORS_FILE", "meta_file", "round_dir", "round_of", "tensors_file"]
