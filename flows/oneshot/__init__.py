"""One-shot LLM compression (``job: oneshot``): ``config`` (the job), ``tasks`` (calibrate, prune a
layer or a block, assemble, export), ``flow`` (the sequence).

Importing this package imports neither Prefect nor MLflow; the flow is ``flows.oneshot.flow``.
"""

from flows.oneshot.config import OneShotJob

__all__ = ["OneShotJob"]
