"""The MLflow pyfunc loader of a winning ticket: the registered ``ticket/`` directory is also an MLflow model.

``ticket/`` holds the ticket (``ticket.safetensors`` + ``ticket.json``) and ``model.json`` (the
network's name); an ``MLmodel`` file beside them names this module, so

    lm = mlflow.pyfunc.load_model("models:/lottery-lenet300_100@winning")
    lm.predict(images)              # [N, 1, 28, 28] or [N, 784] floats -> predicted classes
    model, ticket = lm.get_raw_model()

This module imports no MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOADER_MODULE = __name__


class TicketClassifier:
    """A ticket loaded into its network; ``predict`` returns the class of each image."""

    def __init__(self, directory: str) -> None:
        from flows.lottery.models import load_ticket_model

        card = json.loads((Path(directory) / "model.json").read_text())
        self.model, self.ticket = load_ticket_model(directory, card["model"])
        self.model.eval()

    def get_raw_model(self) -> tuple[torch.nn.Module, Any]:
        """``(model, ticket)``, as :func:`flows.lottery.load_ticket_model` returns them."""
        return self.model, self.ticket

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Predicted classes ``[N]`` (int64) of images ``[N, 1, 28, 28]`` (or flattened ``[N, 784]``)."""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.model(x).argmax(dim=-1).numpy()


def _load_pyfunc(data_path: str) -> TicketClassifier:
    return TicketClassifier(data_path)


__all__ = ["LOADER_MODULE", "TicketClassifier"]
