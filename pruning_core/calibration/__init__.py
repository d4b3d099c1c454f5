"""Calibration: activation statistics (and gradients) collected from real data.

Stage: statistics. ``collect_activation_stats`` fills a :class:`CalibrationContext` from any
torch model with forward hooks, one :class:`ActivationStats` per prunable unit keyed by unit
name (Linear, GPT-2 Conv1D, each fused MoE expert on the tokens routed to it);
``collect_gradients`` adds accumulated weight gradients (Taylor); ``capture_block_inputs`` / ``calibrate_block`` / ``run_block`` are the sequential (block by
block) procedure of the Wanda and SparseGPT references.
"""

from pruning_core.calibration.capture import collect_activation_stats, select_linear_layers, select_units
from pruning_core.calibration.context import CalibrationContext, merge_contexts
from pruning_core.calibration.gradients import GradientStats, causal_lm_loss, collect_gradients
from pruning_core.calibration.hooks import expert_token_table, gated_input
from pruning_core.calibration.sequential import (
    BlockInputs,
    calibrate_block,
    capture_block_inputs,
    find_decoder_blocks,
    run_block,
)
from pruning_core.calibration.stats import ActivationStats

__all__ = [
    "ActivationStats",
    "BlockInputs",
    "CalibrationContext",
    "GradientStats",
    "calibrate_block",
    "capture_block_inputs",
    "causal_lm_loss",
    "collect_activation_stats",
    "collect_gradients",
    "expert_token_table",
    "find_decoder_blocks",
    "gated_input",
    "merge_contexts",
    "run_block",
    "select_linear_layers",
    "select_units",
]
