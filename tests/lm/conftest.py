"""Fixtures for pruning_core.lm: (slow tests only) the real SmolLM2-135M cache. The tiny tokenizer,
model and model directory live in tests/conftest.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import TINY_VOCAB, make_tiny_llama  # noqa: E402,F401


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2-135M directory (converted once per cache, ~20-40 s; then ~0 s)."""
    from pruning_core.lm.smollm2 import smollm2_dir

    return smollm2_dir()
