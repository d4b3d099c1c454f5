"""The networks a lottery job names, and loading a winning ticket back into one.

Imports neither Prefect nor MLflow at import time (MLflow only inside
:func:`load_registered_ticket`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from pruning_core.errors import ConfigError
from pruning_core.lottery import LotteryTicketConfig, LotteryTicketPruner, WinningTicket, load_ticket
from pruning_core.vision import Conv2, LeNet300100

MODELS: dict[str, type[nn.Module]] = {"lenet300_100": LeNet300100, "conv2": Conv2}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised ``lenet300_100`` or ``conv2`` (Glorot-normal, seeded)."""
    if name not in MODELS:
        raise ConfigError("model", f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](generator=torch.Generator().manual_seed(seed))


def load_ticket_model(directory: str | Path, model: str, *,
                      weights: str = "trained") -> tuple[nn.Module, WinningTicket]:
    """Load the ticket checkpoint in ``directory`` (a ``round_NNN`` folder) into a fresh ``model``.

    Args:
        directory: a ticket directory (``ticket.safetensors`` + ``ticket.json``).
        model: ``lenet300_100`` or ``conv2``.
        weights: ``"trained"`` (the ticket's trained sparse network) or ``"rewind"`` (its masked
            rewind weights, to retrain it).

    Returns:
        ``(model, ticket)``: the model with the ticket's weights and masks applied, and the ticket.
    """
    ticket = load_ticket(directory)
    network = build_model(model)
    LotteryTicketPruner(LotteryTicketConfig.from_dict(ticket.config)).apply_ticket(network, ticket, weights=weights)
    return network, ticket


def load_registered_ticket(name: str, alias: str = "winning", *, tracking_uri: str | None = None,
                           dst: str | Path | None = None, weights: str = "trained") -> tuple[nn.Module, WinningTicket]:
    """Load the ticket registered as ``models:/<name>@<alias>`` into a fresh model of its architecture.

    Args:
        name: registered model name (a lottery job registers ``lottery-<model>`` by default).
        alias: the registry alias (``winning``).
        tracking_uri: MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
        dst: where to download the files (default: a new temporary directory).
        weights: as in :func:`load_ticket_model`.

    Returns:
        ``(model, ticket)``: the model with the ticket's weights and masks applied, and the ticket.
    """
    from flows.tracking import Tracker

    directory = Tracker(tracking_uri).download_model(name, alias, dst or tempfile.mkdtemp(prefix="ticket-"))
    card = json.loads((directory / "model.json").read_text())
    return load_ticket_model(directory, card["model"], weights=weights)


__all__ = ["MODELS", "build_model", "load_registered_ticket", "load_ticket_model"]
