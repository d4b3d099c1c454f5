"""Reading parts of a Hugging Face checkpoint without loading the whole model.

Stage: inputs. Per-layer tasks of a pruning job run in other threads or processes (Dask
workers); each reads only the tensors it needs from the model's safetensors files
(``safe_open`` maps the file and copies one tensor), and a sequential-mode task builds just one
decoder block (:mod:`pruning_core.lm.checkpoint` does the block-level work).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from pruning_core.errors import ArtifactError

PathLike = str | os.PathLike[str]
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single-file or sharded checkpoints)."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ArtifactError(str(index), f"malformed checkpoint index ({exc})") from exc
        return {name: root / file for name, file in mapping.items()}
    single = root / "model.safetensors"
    if not single.is_file():
        raise ArtifactError(str(root), "no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(model_dir: PathLike, names: list[str], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read only ``names`` from a checkpoint (e.g. ``model.layers.3.mlp.up_proj.weight``)."""
    files = weight_files(model_dir)
    missing = [n for n in names if n not in files]
    if missing:
        raise ArtifactError(str(model_dir), f"checkpoint has no tensor {missing[0]!r} ({len(missing)} missing)")
    out: dict[str, torch.Tensor] = {}
    for file in {files[n] for n in names}:
        with safe_open(file, framework="pt") as f:
            for n in names:
                if files[n] == file:
                    t = f.get_tensor(n)
                    out[n] = t if dtype is None else t.to(dtype)
    return out


def read_weight(model_dir: PathLike, layer: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of one layer by module name (``model.layers.3.mlp.up_proj``), as ``dtype``."""
    return read_tensors(model_dir, [f"{layer}.weight"], dtype=dtype)[f"{layer}.weight"]


def load_decoder_block(model_dir: PathLike, index: int, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build decoder block ``index`` of a causal LM with its checkpoint weights, and nothing else.

    A shortcut for :meth:`pruning_core.lm.checkpoint.CheckpointReader.load_block` (names go through
    transformers' saved <-> in-memory mapping; non-persistent buffers are recomputed). Open one
    ``CheckpointReader`` when reading several blocks of one model.
    """
    from pruning_core.lm.checkpoint import CheckpointReader

    return CheckpointReader(model_dir).load_block(index, dtype=dtype, device=device)


__all__ = ["load_decoder_block", "read_tensors", "read_weight", "weight_files"]
