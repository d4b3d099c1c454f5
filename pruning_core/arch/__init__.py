"""Model architectures: where a model keeps its decoder blocks and its prunable weights.

Stage: foundation (imports only torch and ``pruning_core.errors``). Every stage that needs to
know a model's shape (calibration, pruning, streaming, Minitron) asks here, so there is one
decoder-block finder and one layer selector.
"""

from pruning_core.arch.layout import decoder_blocks, eval_mode, model_device

__all__ = ["decoder_blocks", "eval_mode", "model_device"]
