"""Lottery Ticket search (``job: lottery``): ``config`` (the job), ``tasks`` (train a round, record
it, publish the ticket), ``flow`` (one parent flow, one subflow per round), ``models`` (the
networks, loading a winning ticket back).

Importing this package imports neither Prefect nor MLflow; the flow is ``flows.lottery.flow``.
"""

from flows.lottery.config import DataSection, LotteryJob, RegistrySection, SearchSection, TrainingSection
from flows.lottery.models import build_model, load_registered_ticket, load_ticket_model

__all__ = ["DataSection", "LotteryJob", "RegistrySection", "SearchSection", "TrainingSection", "build_model",
           "load_registered_ticket", "load_ticket_model"]
