"""Reading parts of a Hugging Face checkpoint without loading the whole model.

Stage: inputs. Per-layer tasks of a pruning job run in other threads or processes (Dask
workers); each reads only the tensors it needs from the model's safetensors files
(``safe_open`` maps the file and copies one tensor), and a sequential-mode task builds just one
decoder block.
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

    The model skeleton is created on the meta device (no memory, no initialization), the block
    is materialized on ``device`` and filled from the safetensors files.
    """
    from pruning_core.calibration.sequential import find_decoder_blocks
    from pruning_core.lm.models import offline_transformers

    tf = offline_transformers()
    config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix, blocks = find_decoder_blocks(skeleton)
    if not 0 <= index < len(blocks):
        raise ArtifactError(str(model_dir), f"decoder block {index} does not exist (the model has {len(blocks)})")
    block = blocks[index].to_empty(device=device)
    unsaved = [n for n, _ in block.named_buffers() if n not in block.state_dict()]
    if unsaved:  # non-persistent buffers are not in the checkpoint: they would stay uninitialized
        raise ArtifactError(str(model_dir), f"block {index} has non-persistent buffers {unsaved}; load the whole model")
    names = {f"{prefix}.{index}.{k}": k for k in block.state_dict()}
    tensors = read_tensors(model_dir, list(names), dtype=dtype)
    block.load_state_dict({names[n]: t for n, t in tensors.items()}, strict=True, assign=False)
    return block.eval()


__all__ = ["load_decoder_block", "read_tensors", "read_weight", "weight_files"]
