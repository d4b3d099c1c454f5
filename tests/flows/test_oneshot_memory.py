"""Peak memory of the one-shot job does not grow with depth (issue 13 §3).

Two synthetic bfloat16 Llamas of one width, 2 and 8 decoder layers
(``scripts/make_synthetic_llama.py``), go through ``prune run`` (Wanda 50%, one-pass, with dense
and pruned perplexity) each in a fresh process that reports its own peak RSS (``VmHWM``). A job
holding the model would grow by at least the 6 extra blocks (twice that in float32, the dtype blocks
are computed in on CPU); the streamed job grows by less than two float32 blocks: the per-unit
bookkeeping only (packed masks, per-channel statistics, the table and figure, Prefect's task runs:
~1 MB per unit, which at this small width is comparable to a block).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruning_core.lm.shards import CheckpointLayout

pytestmark = [pytest.mark.flows, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
WIDTH = ["--hidden", "1024", "--intermediate", "2816", "--heads", "16"]
CHILD = r"""
import re, sys
from pathlib import Path
from flows.runtime import configure_environment
configure_environment()
from flows.cli import main
code = main(["run", sys.argv[1], "--output-dir", sys.argv[2]])
peak = int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
print("PEAK", peak, file=sys.stderr)
raise SystemExit(code)
"""


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _peak_of_job(tmp_path: Path, layers: int) -> tuple[int, int, dict]:
    """(peak RSS bytes of the job's process, bytes of one decoder block on disk, summary)."""
    model = tmp_path / f"llama{layers}"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_llama.py"), str(model), *WIDTH,
                    "--layers", str(layers)], check=True, capture_output=True, env=_env())
    config = tmp_path / f"job{layers}.yaml"
    config.write_text(yaml.safe_dump({
        "job": "oneshot", "name": f"memory-{layers}", "model": str(model), "method": "wanda", "sparsity": 0.5,
        "device": "cpu", "calibration": {"num_windows": 4, "window_length": 64, "batch_size": 4},
        # speed off: inference needs the dense and the output model whole (the one stage that does)
        "evaluation": {"num_windows": 2, "window_length": 64, "batch_size": 2, "error_windows": 2, "speed": False},
        "tracking": {"log_model": False}}))
    out = tmp_path / f"run{layers}"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config), str(out)], cwd=tmp_path, capture_output=True,
                          text=True, env={**_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(re.search(r"^PEAK (\d+)$", proc.stderr, re.M).group(1))
    block = sum(e.nbytes for n, e in CheckpointLayout.read(model).tensors.items() if n.startswith("model.layers.0."))
    return peak, block, json.loads((out / "summary.json").read_text())


def test_peak_rss_of_the_job_does_not_grow_with_depth(prefect_server, tmp_path):
    peak2, block, small = _peak_of_job(tmp_path, 2)
    peak8, _, deep = _peak_of_job(tmp_path, 8)
    extra = 6 * block  # the bf16 bytes of the 6 extra blocks (twice that in float32)
    two_blocks = 2 * 2 * block  # two blocks as held in memory (float32)
    print(f"peak RSS: 2 layers {peak2 / 2**20:.0f} MiB, 8 layers {peak8 / 2**20:.0f} MiB, "
          f"growth {(peak8 - peak2) / 2**20:.0f} MiB; 6 extra blocks {extra / 2**20:.0f} MiB in bf16")
    assert peak8 - peak2 < two_blocks
    assert small["sparsity"] == deep["sparsity"] == 0.5 and len(deep["layers"]) == 8 * 7
