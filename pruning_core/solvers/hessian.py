"""Alias kept for importers outside the solvers (``importance.sparsegpt``): the Hessian helpers
live in :mod:`pruning_core.calibration.hessian` now, next to the statistics."""

from pruning_core.calibration.hessian import (
    DAMPING_GROWTH,
    MAX_DAMPING_RETRIES,
    SYMMETRY_RTOL,
    InverseHessian,
    check_hessian,
    check_symmetric,
    inverse_hessian,
)

__all__ = [
    "DAMPING_GROWTH",
    "MAX_DAMPING_RETRIES",
    "SYMMETRY_RTOL",
    "InverseHessian",
    "check_hessian",
    "check_symmetric",
    "inverse_hessian",
]
