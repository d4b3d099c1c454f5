"""Peak memory of the streaming pipeline does not grow with depth (issue 13 §3).

Synthetic bf16 Llamas of one width (hidden 512, intermediate 1536: 3.4 M parameters, 13.6 MB per
block in float32) with 4 and 16 layers are written by ``scripts/make_synthetic_llama.py``; a fresh
interpreter then runs streaming perplexity and a streaming one-pass calibration that prunes and
writes every block, and reports the peak RSS of each (``VmHWM``, reset before each run, with
glibc's mmap threshold fixed so freed tensors leave the process as in ``benchmarks/_memory.py``).
Holding the model would add 163 MB at 16 layers; the test allows less than two blocks (27 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCK_BYTES = (4 * 512 * 512 + 3 * 512 * 1536) * 4

CHILD = r"""
import contextlib, ctypes, json, re, sys
from pathlib import Path
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large tensors are returned when freed
ctypes.CDLL("libc.so.6").mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
import torch
from pruning_core.calibration import ActivationStats
from pruning_core.lm.stream import LayerStream, calibrate_blocks, streaming_perplexity
from pruning_core.lm.writer import CheckpointWriter

def kib(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

def peak(fn):
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return kib("VmHWM") * 1024

model, out = sys.argv[1], sys.argv[2]
windows = torch.randint(3, 384, (4, 64), generator=torch.Generator().manual_seed(0))
streaming_perplexity(model, windows[:1, :8], progress=False)  # warm up: imports, first allocations

def observe(i, block, inputs):
    stats = [ActivationStats(m.in_features) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda mod, a, o, s=s: s.update(a[0]))
             for m, s in zip([m for m in block.modules() if isinstance(m, torch.nn.Linear)], stats)]
    stack = contextlib.ExitStack()
    stack.callback(lambda: [h.remove() for h in hooks])
    return stack

def finish(i, block):
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.masked_fill_(m.weight.abs() < m.weight.abs().median(), 0)
    return {"block": i}

def calibrate():
    stream = LayerStream(model, windows, batch_size=2, head=False, progress=False)
    with CheckpointWriter(stream.reader, out) as writer:
        calibrate_blocks(stream, finish, observe=observe, sequential=False, writer=writer)
        writer.finish()

print(json.dumps({"perplexity": peak(lambda: streaming_perplexity(model, windows, batch_size=2, progress=False)),
                  "calibrate": peak(calibrate)}))
"""


def _synthetic(directory, layers, tokenizer_dir):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_llama.py"), str(directory),
                    "--hidden", "512", "--intermediate", "1536", "--layers", str(layers), "--heads", "8",
                    "--tokenizer", str(tokenizer_dir), "--max-shard-size", "40MB"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return directory


def _peaks(model, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out)], check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path, tiny_model_dir_session):
    shallow = _peaks(_synthetic(tmp_path / "l4", 4, tiny_model_dir_session), tmp_path / "o4")
    deep = _peaks(_synthetic(tmp_path / "l16", 16, tiny_model_dir_session), tmp_path / "o16")
    for job in ("perplexity", "calibrate"):
        growth = deep[job] - shallow[job]
        print(f"{job}: peak RSS {shallow[job] / 2**20:.1f} MiB at 4 layers, {deep[job] / 2**20:.1f} MiB at 16 "
              f"(block: {BLOCK_BYTES / 2**20:.1f} MiB in float32)")
        assert growth < 2 * BLOCK_BYTES, f"{job}: peak RSS grew by {growth / 2**20:.1f} MiB from 4 to 16 layers"
    assert (tmp_path / "o16" / "model.safetensors.index.json").is_file()
