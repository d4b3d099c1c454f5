"""Model architectures: where a model keeps its decoder blocks and its prunable weights.

Stage: foundation (imports only torch and ``pruning_core.errors``; transformers lazily, to build
a ``meta`` skeleton from a config). Every stage that needs to know a model's shape (calibration,
pruning, streaming, Minitron) asks here, so there is one decoder-block finder
(:func:`decoder_blocks`), one layer selector (:func:`prunable_units`) and one table of supported
families (:func:`architecture_support`).
"""

from pruning_core.arch.layout import MODEL_BUILD_LOCK, decoder_blocks, eval_mode, model_device
from pruning_core.arch.support import (
    FAMILIES,
    ArchitectureSupport,
    Family,
    Job,
    architecture_support,
    meta_model,
    require_architecture,
)
from pruning_core.arch.units import PrunableUnit, conv1d_class, matrix_units, prunable_units

__all__ = [
    "FAMILIES",
    "MODEL_BUILD_LOCK",
    "ArchitectureSupport",
    "Family",
    "Job",
    "PrunableUnit",
    "architecture_support",
    "conv1d_class",
    "decoder_blocks",
    "eval_mode",
    "matrix_units",
    "meta_model",
    "model_device",
    "prunable_units",
    "require_architecture",
]
