"""Shared protocol for the allocation and recovery benchmarks (issue 16).

SmolLM2-135M (``pruning_core.lm.load_causal_lm("smollm2")``, float32, CPU); calibration = 64
windows x 256 tokens of *Emma* at seeded random starts (seed 0, as the one-shot job draws them);
evaluation = perplexity on the first 64 x 256 tokens of *Pride and Prejudice* (dense 28.93) and of
*Persuasion* (the second held-out text, ``pruning_core/lm/data/persuasion.txt.gz``). Results go to
a JSON file row by row (atomic rewrite), so a killed run resumes with the rows it has.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
PERSUASION = REPO / "pruning_core" / "lm" / "data" / "persuasion.txt.gz"
EVAL_TEXTS = {"pride_and_prejudice": "pride_and_prejudice", "persuasion": str(PERSUASION)}


def add_threads_argument(parser: Any) -> None:
    """``--threads``: torch's intra-op threads for the run (0 keeps torch's default)."""
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 wastes "
                        "far less CPU on a shared machine (190 vs 78 tokens per CPU-second on SmolLM2)")


def start(args: Any) -> None:
    """Apply ``--threads`` and set up the benchmark's logging."""
    import logging

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def load_model():
    """``(model, tokenizer)``: SmolLM2-135M in float32 on the CPU, eval mode."""
    from pruning_core.lm import load_causal_lm

    return load_causal_lm("smollm2", dtype=torch.float32, device="cpu")


def text_tokens(tokenizer: Any, text: str) -> torch.Tensor:
    from pruning_core.lm import load_text, tokenize_corpus

    return tokenize_corpus(tokenizer, load_text(text))


def calibration(tokenizer: Any, n: int = 64, length: int = 256, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` Emma windows exactly as the one-shot job draws them."""
    from pruning_core.lm import calibration_windows

    return calibration_windows(text_tokens(tokenizer, "emma"), n, length, seed)


def evaluation(tokenizer: Any, n: int = 64, length: int = 256) -> dict[str, torch.Tensor]:
    """``{text: [n, length]}`` first tokens of each held-out text, non-overlapping windows."""
    from pruning_core.lm import evaluation_windows

    return {name: evaluation_windows(text_tokens(tokenizer, src), n, length) for name, src in EVAL_TEXTS.items()}


def perplexities(model: Any, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from pruning_core.lm import perplexity

    return {name: perplexity(model, w, batch_size=8, progress=False) for name, w in windows.items()}


def snapshot(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named layers' weights (to restore the dense model between rows)."""
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def restore_(model: Any, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, w in weights.items():
            model.get_submodule(n).weight.copy_(w)


def zero_fraction(model: Any, names: list[str]) -> float:
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)
    return zeros / sum(model.get_submodule(n).weight.numel() for n in names)


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Results:
    """Rows by id in a JSON file, rewritten atomically after every row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"rows": {}}

    def has(self, key: str) -> bool:
        return key in self.data["rows"]

    def get(self, key: str) -> Any:
        return self.data["rows"][key]

    def put(self, key: str, row: dict[str, Any]) -> None:
        self.data["rows"][key] = {**row, "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "load_average": os.getloadavg()[0]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), wall seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process so far (all threads): on a quiet 2-core machine, wall ≈ CPU / 2
    at best; on a shared one, the CPU time is the comparable figure."""
    return time.process_time()
