"""Minitron depth/width search (``job: minitron``): ``config`` (the job and its target), ``tasks``
(score once, build and score each candidate, rebuild the chosen one), ``flow`` (the search).

Importing this package imports neither Prefect nor MLflow; the flow is ``flows.minitron.flow``.
"""

from flows.minitron.config import MinitronJob, candidate_id, check_head_groups, short_architecture

__all__ = ["MinitronJob", "candidate_id", "check_head_groups", "short_architecture"]
