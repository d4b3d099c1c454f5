"""pruning_core: importance scoring, sparsity masks, sparse formats, calibration statistics,
SparseGPT, structured (depth/width) pruning and Lottery Ticket search, on plain torch.

Stages: statistics (calibration) -> scores (importance) -> masks/plans -> apply -> formats.
It imports no Prefect, MLflow or Dask; the flows package orchestrates it.
"""
