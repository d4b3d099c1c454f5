"""The real thing, reduced: ``prune run`` (the console script, as a subprocess) prunes the shipped
SmolLM2-135M with Wanda 50% on 8 x 128 tokens of Emma and evaluates on 8 x 128 tokens of Pride and
Prejudice; the pruned directory loads with ``from_pretrained`` and generates text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.flows]

REPO = Path(__file__).resolve().parents[2]
# Dense SmolLM2-135M (Q4_1-dequantized, fp32) on the first 8 x 128 tokens of Pride and Prejudice,
# measured on this test's first run (CPU, torch 2.13); the 64 x 256 protocol gives 28.93.
DENSE_PPL_8x128 = 27.2777

CONFIG = """\
job: oneshot
name: smollm2-wanda-smoke
model: smollm2
method: wanda
sparsity: 0.5
device: cpu
calibration: {text: emma, num_windows: 8, window_length: 128, seed: 0, batch_size: 8}
evaluation: {text: pride_and_prejudice, num_windows: 8, window_length: 128, batch_size: 8}
tracking: {experiment: smoke, log_model: false}
"""


def test_prune_run_on_smollm2(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "job.yaml").write_text(CONFIG)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # this checkout's code
    prune = Path(sys.executable).parent / "prune"
    proc = subprocess.run([str(prune), "run", "job.yaml", "--output-dir", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())

    assert summary["perplexity_before"] == pytest.approx(DENSE_PPL_8x128, rel=1e-3)
    assert summary["sparsity"] == 0.5  # every row of all 210 layers loses exactly half
    assert len(summary["layers"]) == 210 and {r["sparsity"] for r in summary["layers"]} == {0.5}
    after = summary["perplexity_after"]
    assert math.isfinite(after) and after > summary["perplexity_before"]
    assert json.loads(proc.stdout)["perplexity_after"] == after  # the CLI prints the summary too

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    weight = model.model.layers[3].mlp.up_proj.weight
    assert int((weight == 0).sum()) == weight.numel() // 2  # the pruned weights, not the dense ones
    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    assert new.numel() == 8 and tokenizer.decode(new, skip_special_tokens=True).strip()

    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perplexity_after"] == pytest.approx(after)
