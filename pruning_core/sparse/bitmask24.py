"""The ``sparse-24-bitmask`` layout of compressed-tensors (what llm-compressor writes for 2:4 models).

Stage: formats. Read from compressed-tensors 0.13.0
(``compressors/sparse_compressors/sparse_24_bitmask.py``, ``utils/helpers.py`` ``pack_bitmasks``,
``compressors/model_compressors/model_compressor.py`` ``update_config``); no code is copied. For a
2:4-sparse ``[rows, cols]`` weight of the module ``<layer>`` the checkpoint holds, instead of
``<layer>.weight``:

* ``<layer>.compressed``: ``[rows, cols/2]``, the weight's dtype. Row ``r`` holds the stored values
  of row ``r`` in column order (two per group of four columns).
* ``<layer>.bitmask``: ``[rows, ceil(cols/8)]`` uint8. Bit ``c % 8`` of byte ``c // 8`` of row
  ``r`` is set when column ``c`` is stored (``numpy.packbits(axis=-1, bitorder="little")``).
* ``<layer>.shape``: int64 ``[2, 1]``, the dense ``(rows, cols)``.

Decompression scatters ``compressed`` (flattened) into the set bits of the unpacked mask in
row-major order. compressed-tensors picks the two stored positions per group by magnitude; we
store the positions our mask keeps (a group keeping fewer than two also stores its lowest pruned
positions, holding 0), so the dense weight comes back exactly either way. ``config.json`` gets a
``quantization_config`` naming the format, as ``ModelCompressor.update_config`` writes it.

Serving: vLLM read this format with its CUTLASS 2:4 kernels from v0.7 (PR #12097) until it
dropped Sparse24 models (PR #36799, 2026-03; v0.19.1 raises NotImplementedError), and
compressed-tensors removed its Sparse24 compressor after 0.14. Loaders of those versions read it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pruning_core.errors import ArtifactError, ConfigError
from pruning_core.sparse.semi import SemiStructuredTensor

FORMAT = "sparse-24-bitmask"
#: The compressed-tensors release whose layout (and config keys) this module reproduces.
LAYOUT_VERSION = "0.13.0"
ROLES = ("compressed", "bitmask", "shape")


def encode(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a 2-D weight whose ``mask`` (True = keep) is 2:4 along its rows.

    Returns:
        ``{"compressed": [rows, cols/2], "bitmask": [rows, ceil(cols/8)] uint8, "shape": [2, 1] int64}``.

    Raises:
        InvalidPattern: ``cols`` not divisible by 4, or a group of 4 keeping more than 2.
    """
    semi = SemiStructuredTensor.from_dense(weight, mask)  # checks 2:4; exactly 2 slots per group
    rows, cols = semi.shape
    slots = semi.indices().view(rows, cols // 4, 2)  # in-group positions, ascending
    stored = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, slots.cpu(), True)
    bitmask = np.packbits(stored.view(rows, cols).numpy(), axis=-1, bitorder="little")
    return {
        "compressed": semi.values.detach().cpu().contiguous(),  # slot order == column order
        "bitmask": torch.from_numpy(bitmask),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def decode(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, *, name: str) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight from its three stored tensors (inverse of :func:`encode`).

    Raises:
        ArtifactError: shapes that do not fit together, or a row/group that does not store
            exactly 2 of every 4 positions (names the tensor).
    """
    dims = [int(v) for v in shape.reshape(-1).tolist()]
    if len(dims) != 2 or dims[1] % 4:
        raise ArtifactError(name, f"{FORMAT}: shape must be (rows, cols) with cols divisible by 4, got {dims}")
    rows, cols = dims
    if tuple(compressed.shape) != (rows, cols // 2) or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise ArtifactError(name, f"{FORMAT}: compressed {list(compressed.shape)} / bitmask "
                                  f"{list(bitmask.shape)} do not fit shape {dims}")
    bits = np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    stored = torch.from_numpy(bits)  # [rows, cols]
    per_group = stored.view(rows, cols // 4, 4).sum(dim=-1)
    if bool((per_group != 2).any()):
        r, g = (int(i) for i in torch.nonzero(per_group != 2)[0])
        raise ArtifactError(name, f"{FORMAT}: row {r}, group {g} stores {int(per_group[r, g])} positions, not 2")
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    dense[stored] = compressed.reshape(-1)
    return dense


def hf_config(config: dict[str, Any], targets: list[str], global_sparsity: float) -> dict[str, Any]:
    """``config`` (a Hugging Face ``config.json`` mapping) with the compressed-tensors
    ``quantization_config`` of a 2:4 sparse-only model whose compressed modules are ``targets``.

    Raises:
        ConfigError: ``config`` already carries a ``quantization_config`` (a quantized model).
    """
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConfigError("config", f"the model already has a quantization_config (quant_method {method!r}); "
                                    f"the {FORMAT} export writes a sparse-only one")
    sparsity = {"format": FORMAT, "sparsity_structure": "2:4", "targets": sorted(targets),
                "ignore": ["lm_head"], "global_sparsity": float(global_sparsity)}
    quant = {"quant_method": "compressed-tensors", "version": LAYOUT_VERSION,
             "sparsity_config": sparsity, "transform_config": {}}
    return {**config, "quantization_config": quant}


__all__ = ["FORMAT", "LAYOUT_VERSION", "decode", "encode", "hf_config"]
