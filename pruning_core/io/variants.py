"""The allocation search's database on disk: one file per unit, holding the unit pruned at each of
its grid levels (:class:`pruning_core.allocation.database.UnitVariant`).

Stage: io. A file holds, per level ``l``, the bit-packed keep mask of every layer of the unit
(``"<l>/mask/<layer>"``) and, for methods that update kept weights (SparseGPT), the pruned weight
(``"<l>/weight/<layer>"``); its metadata holds the masks' shapes and each level's sparsity.
Written atomically (:func:`pruning_core.io.tensors.save_tensors`); a reader loads only the
tensors of the level it asks for. :class:`VariantStore` is the lazy ``(unit, level) ->
UnitVariant`` mapping that :class:`~pruning_core.allocation.database.CandidateAssembler` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pruning_core.allocation.database import UnitVariant
from pruning_core.errors import ArtifactError
from pruning_core.io.masks import pack_mask, unpack_mask
from pruning_core.io.tensors import check_safetensors, load_tensors, read_metadata, save_tensors

PathLike = str | os.PathLike[str]


def save_unit_variants(path: PathLike, variants: Mapping[int, UnitVariant],
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write one unit's ``{level: variant}`` to ``path`` atomically."""
    tensors, shapes = {}, {}
    for level, variant in variants.items():
        for name, mask in variant.masks.items():
            tensors[f"{level}/mask/{name}"] = pack_mask(mask)
            shapes[name] = list(mask.shape)
        tensors.update({f"{level}/weight/{name}": w for name, w in variant.weights.items()})
    levels = {str(level): variant.sparsity for level, variant in variants.items()}
    return save_tensors(path, tensors, {**(metadata or {}), "shapes": json.dumps(shapes), "levels": json.dumps(levels)})


def variant_levels(path: PathLike) -> dict[int, float]:
    """``{level: sparsity}`` of the variants in a file of :func:`save_unit_variants`."""
    meta = read_metadata(path)
    if "levels" not in meta or "shapes" not in meta:
        raise ArtifactError(str(path), "not a unit-variants file (no 'levels'/'shapes' metadata)")
    return {int(level): float(s) for level, s in json.loads(meta["levels"]).items()}


def load_unit_variant(path: PathLike, level: int) -> UnitVariant:
    """The variant at ``level`` (only its tensors are read).

    Raises:
        ArtifactError: not a unit-variants file, or it has no variant at ``level``.
    """
    sparsity = variant_levels(path).get(level)
    if sparsity is None:
        raise ArtifactError(str(path), f"no variant at level {level} (levels {sorted(variant_levels(path))})")
    shapes = json.loads(read_metadata(path)["shapes"])
    prefix = f"{level}/"
    tensors = load_tensors(path, [n for n in check_safetensors(path) if n.startswith(prefix)])
    masks, weights = {}, {}
    for key, tensor in tensors.items():
        kind, name = key[len(prefix):].split("/", 1)
        if kind == "mask":
            masks[name] = unpack_mask(tensor, tuple(shapes[name]), name=name)
        else:
            weights[name] = tensor
    return UnitVariant(masks, weights, sparsity)


class VariantStore(Mapping[tuple[int, int], UnitVariant]):
    """``(unit index, level) -> UnitVariant`` over the files of :func:`save_unit_variants`, one per
    unit in unit order, read lazily (nothing is kept in memory)."""

    def __init__(self, files: Sequence[PathLike]) -> None:
        self.files = [Path(f) for f in files]

    def __getitem__(self, key: tuple[int, int]) -> UnitVariant:
        unit, level = key
        if not 0 <= unit < len(self.files) or level not in variant_levels(self.files[unit]):
            raise KeyError(key)
        return load_unit_variant(self.files[unit], level)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for unit, file in enumerate(self.files):
            yield from ((unit, level) for level in sorted(variant_levels(file)))

    def __len__(self) -> int:
        return sum(len(variant_levels(f)) for f in self.files)


__all__ = ["VariantStore", "load_unit_variant", "save_unit_variants", "variant_levels"]
