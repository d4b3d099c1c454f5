"""Checks against compressed-tensors 0.13, the last release that reads the legacy 2:4 layout.

compressed-tensors removed its sparse compressors after 0.14 (as vLLM removed its 2:4 kernels),
while the pipeline itself needs a newer release (transformers 5 loads ``pack-quantized``
checkpoints only with compressed-tensors >= 0.15). ``./dev.sh test`` therefore installs 0.13
apart, into ``.venv/legacy-ct`` (``pip install --no-deps --target``), and these checks run in a
subprocess with that directory first on ``sys.path``. Without it (a dev machine set up by hand)
the tests that need it skip with the install command.

Run as a script: ``python tests/legacy_ct.py arrays DENSE OURS`` or
``python tests/legacy_ct.py decompress EXPORT_DIR REFERENCE``; prints ``ok`` or fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEGACY_CT = Path(os.environ.get("PRUNING_LEGACY_CT", REPO / ".venv" / "legacy-ct"))
INSTALL = f"pip install --no-deps --target {LEGACY_CT} compressed-tensors==0.13.0"


def run_legacy_check(mode: str, *paths: Path) -> str:
    """Run this file as ``mode`` under compressed-tensors 0.13; skips when it is not installed."""
    import pytest

    if not (LEGACY_CT / "compressed_tensors").is_dir():
        pytest.skip(f"compressed-tensors 0.13 not installed apart ({INSTALL})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LEGACY_CT), str(REPO)])}
    done = subprocess.run([sys.executable, __file__, mode, *map(str, paths)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def _same_bits(a, b) -> bool:  # noqa: ANN001 - torch tensors
    import torch

    return torch.equal((a + 0.0).view(torch.int32), (b + 0.0).view(torch.int32))


def _arrays(dense_file: str, ours_file: str) -> None:
    """compressed-tensors' Sparse24BitMaskTensor.from_dense of each dense weight == our arrays."""
    from compressed_tensors.compressors.sparse_compressors import sparse_24_bitmask as sparse24
    from safetensors.torch import load_file

    dense, ours = load_file(dense_file), load_file(ours_file)
    for name, w in dense.items():
        theirs = sparse24.Sparse24BitMaskTensor.from_dense(w).dict(name_prefix=name)
        for key, tensor in theirs.items():
            assert (ours[key] == tensor).all() and ours[key].dtype == tensor.dtype, key


def _decompress(export_dir: str, reference: str) -> None:
    """The library's own decompressor yields every reference weight back, bit for bit."""
    import json

    from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskCompressor
    from safetensors.torch import load_file

    qc = json.loads((Path(export_dir) / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(qc)
    assert isinstance(compressor.sparsity_compressor, Sparse24BitMaskCompressor)
    dense = dict(compressor.sparsity_compressor.decompress(export_dir))
    expected = load_file(reference)
    assert set(expected) <= set(dense), sorted(set(expected) - set(dense))[:4]
    assert all(_same_bits(dense[k], expected[k]) for k in expected)


if __name__ == "__main__":
    import compressed_tensors

    assert compressed_tensors.__version__.startswith("0.13"), compressed_tensors.__version__
    {"arrays": _arrays, "decompress": _decompress}[sys.argv[1]](*sys.argv[2:])
    print("ok")
