"""The model card (README.md) rendered from a job summary: golden text, and its branches."""

from __future__ import annotations

from pruning_core.lm.card import hub_id, render_model_card, write_model_card

SUMMARY = {
    "kind": "oneshot", "base_model": "smollm2", "method": "wanda", "pattern": "2:4", "scope": None,
    "sparsity": 0.5, "target_sparsity": 0.5,
    "quantization": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True},
    "calibration": {"text": "emma", "num_windows": 128, "window_length": 256},
    "evaluation": {"text": "pride_and_prejudice", "num_windows": 64, "window_length": 256},
    "perplexity_before": 20.1234, "perplexity_after": 25.5,
    "size": {"input_bytes": 269060552, "output_bytes": 90000000},
    "speed": {"prefill_ratio": 1.01, "decode_ratio": 0.98, "device": "cpu"},
    "config": "model: smollm2\nmethod: wanda\npattern: '2:4'\n", "command": "prune run job.yaml",
    "format": "pack-quantized",
}

GOLDEN = """---
base_model: HuggingFaceTB/SmolLM2-135M
library_name: transformers
pipeline_tag: text-generation
tags:
- pruned
- pruning-pipeline
- wanda
- sparse
- compressed-tensors
- w4a16
---

# HuggingFaceTB/SmolLM2-135M (wanda 2:4, W4A16)

Made with the pruning pipeline.

## Method

One-shot **wanda** pruning, pattern `2:4`.
Sparsity of the pruned layers: 0.5000 (target 0.5).

## Quantization

Weight-only GPTQ to 4 bits, groups of 64, symmetric (W4A16), keeping the pruning mask; stored in \
compressed-tensors' `pack-quantized` format.

## Data

- Calibration: `emma`, 128 windows of 256 tokens.
- Evaluation: `pride_and_prejudice`, 64 windows of 256 tokens.

## Results

| metric | value |
|---|---|
| perplexity before | 20.123 |
| perplexity after | 25.500 |
| size on disk | 90.0 MB (0.334 of the input's 269.1 MB) |
| prefill speed vs. dense | 1.01x (measured on cpu) |
| decode speed vs. dense | 0.98x (measured on cpu) |

## How it was made

```bash
prune run job.yaml
```

```yaml
model: smollm2
method: wanda
pattern: '2:4'
```

## How to load (needs `pip install compressed-tensors`)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```
"""


def test_golden_card():
    assert render_model_card(SUMMARY) == GOLDEN


def test_minitron_and_plain_branches(tmp_path):
    card = render_model_card({"kind": "minitron", "base_model": str(tmp_path / "my-model"),
                              "architecture": {"before": {"num_hidden_layers": 30}, "after": {"num_hidden_layers": 24}},
                              "perplexity_before": None, "perplexity_after": 30.0})
    assert "base_model:" not in card  # a local path is not a Hub id
    assert "# my-model (Minitron-pruned)" in card and "| num_hidden_layers | 30 | 24 |" in card
    assert "- minitron" in card and "| perplexity before | n/a |" in card
    assert "None: weights are stored in the input's dtype." in card and "compressed-tensors`)" not in card
    path = write_model_card(tmp_path, {"kind": "oneshot", "method": "magnitude", "pattern": "unstructured"})
    assert path.read_text().startswith("---\nlibrary_name: transformers\n")


def test_hub_id(tmp_path):
    assert hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert hub_id(str(tmp_path)) is None and hub_id(None) is None and hub_id("./a/b") is None


def test_minitron_job_card(tmp_path, tiny_lm):
    # the hook rebuild_chosen calls: README.md in the chosen model's directory, recorded in its manifest
    from flows.jobs import parse_config
    from flows.minitron.tasks import _write_card
    from pruning_core.io.manifest import Manifest
    from pruning_core.lm import save_pretrained_atomic
    from pruning_core.lm.card import architecture_fields

    model, tokenizer = tiny_lm
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "model")
    job = parse_config({"job": "minitron", "model": "smollm2", "target": {"layers": 24}}, "t.yaml")
    before = architecture_fields(model.config)
    _write_card(job, out, before, {**before, "num_hidden_layers": 1})
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card and "| num_hidden_layers | 2 | 1 |" in card
    assert "| hidden_size | 64 | 64 |" in card
    Manifest(out).verify()
