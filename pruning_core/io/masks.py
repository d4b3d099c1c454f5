"""Boolean masks on disk, bit-packed in a safetensors file (8x smaller than bool storage).

Stage: io. Each mask (True = keep) is flattened in row-major order and packed with
``numpy.packbits(bitorder="little")``: element ``i`` is bit ``i % 8`` of byte ``i // 8``, and
the unused bits of the last byte are zero. The packed bytes are stored as a 1-D uint8 tensor
under the mask's name; the original shapes are a JSON object in the file metadata under
``pruning_core.masks``, together with a format version. Loading checks the byte counts and the
zero padding, so a file that is not a mask file, or a corrupt one, is an :class:`ArtifactError`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from pruning_core.errors import ArtifactError, ConfigError, InvalidMask
from pruning_core.io.tensors import load_tensors, read_metadata, save_tensors

PathLike = str | os.PathLike[str]
SHAPES_KEY = "pruning_core.masks"
FORMAT = "packbits-le-v1"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask of any shape into ``ceil(numel / 8)`` uint8 bytes (little bit order)."""
    flat = mask.detach().to("cpu").reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...], *, name: str = "mask") -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``[ceil(numel/8)]`` uint8 -> bool tensor of ``shape``.

    Raises:
        ArtifactError: the byte count does not match ``shape`` or the padding bits are not zero.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ArtifactError(
            name,
            f"packed mask has {packed.numel()} {packed.dtype} values in {packed.dim()}-D, "
            f"expected {(numel + 7) // 8} uint8 bytes for shape {list(shape)}",
        )
    bits = np.unpackbits(packed.numpy(), bitorder="little")
    if bits[numel:].any():
        raise ArtifactError(name, f"padding bits after element {numel} are not zero: corrupt mask")
    return torch.from_numpy(bits[:numel].astype(np.bool_)).reshape(shape)


def save_masks(
    path: PathLike, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write boolean masks, bit-packed, to a safetensors file atomically.

    Args:
        path: The target file.
        masks: Name (usually the parameter name) -> bool tensor of the weight's shape.
        metadata: Optional extra ``str -> str`` metadata (the key ``pruning_core.masks`` is reserved).

    Raises:
        InvalidMask: a mask is not a bool tensor (names it and its dtype).
        ConfigError: ``metadata`` uses the reserved key.
    """
    return save_masks_from(path, masks.items(), metadata)


def save_masks_from(path: PathLike, masks: Iterable[tuple[str, torch.Tensor]],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """:func:`save_masks` from ``(name, bool mask)`` pairs, each packed as it comes (memory: the
    packed bits of all masks plus one unpacked mask; e.g. masks loaded one at a time from files)."""
    extra = dict(metadata or {})
    if SHAPES_KEY in extra:
        raise ConfigError("metadata", f"the key '{SHAPES_KEY}' is reserved for the mask shapes")
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, mask in masks:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidMask(f"masks must be torch.bool tensors, got {kind}", name=name)
        packed[name] = pack_mask(mask)
        shapes[name] = list(mask.shape)
    extra[SHAPES_KEY] = json.dumps({"format": FORMAT, "shapes": shapes}, sort_keys=True)
    return save_tensors(path, packed, metadata=extra)


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    raw = read_metadata(path).get(SHAPES_KEY)
    if raw is None:
        raise ArtifactError(str(path), f"not a mask file: no '{SHAPES_KEY}' metadata")
    try:
        info = json.loads(raw)
        if info["format"] != FORMAT:
            raise ArtifactError(str(path), f"unknown mask format {info['format']!r}, expected {FORMAT!r}")
        return {name: tuple(int(d) for d in shape) for name, shape in info["shapes"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(str(path), f"malformed '{SHAPES_KEY}' metadata ({exc})") from exc


def load_masks(path: PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read bool masks written by :func:`save_masks`; only ``names`` are read when given.

    Returns:
        Name -> bool tensor of the saved shape, in the order of ``names`` (sorted if None).

    Raises:
        ArtifactError: the file is missing, corrupt or not a mask file, or a name is absent.
    """
    p = Path(path)
    shapes = _read_shapes(p)
    wanted = sorted(shapes) if names is None else list(names)
    missing = [n for n in wanted if n not in shapes]
    if missing:
        raise ArtifactError(str(p), f"no masks named {missing[:5]}; it holds {len(shapes)} masks")
    packed = load_tensors(p, wanted)
    return {n: unpack_mask(packed[n], shapes[n], name=f"{p}:{n}") for n in wanted}


__all__ = ["load_masks", "pack_mask", "save_masks", "save_masks_from", "unpack_mask"]
