"""The MLflow pyfunc loader of a pruned causal LM: a Hugging Face directory that is also an MLflow model.

A job's output directory is logged once, as the run's ``model/`` artifact, together with an
``MLmodel`` file whose ``python_function`` flavor names this module (:meth:`Tracker.log_pyfunc_flavor`).
Nothing is copied twice: the same files are the Hugging Face checkpoint and the MLflow model.

    import mlflow
    lm = mlflow.pyfunc.load_model("models:/oneshot-smollm2@wanda-50")
    lm.predict(["It is a truth universally acknowledged"], params={"max_new_tokens": 20})
    model, tokenizer = lm.get_raw_model()

This module imports no MLflow (MLflow imports it to load the model).
"""

from __future__ import annotations

from typing import Any

import torch

LOADER_MODULE = __name__
DEFAULT_NEW_TOKENS = 20


def _prompts(model_input: Any) -> list[str]:
    """A string, a list of strings, or a DataFrame whose first column holds the prompts."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame / Series
        column = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(v) for v in column.tolist()]
    return [str(v) for v in model_input]


class PrunedCausalLM:
    """A loaded causal LM and its tokenizer; ``predict`` continues prompts greedily."""

    def __init__(self, directory: str) -> None:
        from pruning_core.lm import load_causal_lm

        self.directory = directory
        self.model, self.tokenizer = load_causal_lm(directory)

    def get_raw_model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, as :func:`pruning_core.lm.load_causal_lm` returns them."""
        return self.model, self.tokenizer

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """Greedy continuations (``params["max_new_tokens"]``, default 20) of each prompt, prompt excluded."""
        new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_NEW_TOKENS))
        out = []
        for prompt in _prompts(model_input):
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            generated = self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _load_pyfunc(data_path: str) -> PrunedCausalLM:
    """MLflow's entry point: ``data_path`` is the downloaded model directory itself."""
    return PrunedCausalLM(data_path)


__all__ = ["LOADER_MODULE", "PrunedCausalLM"]
