"""Recovery distillation of pruned models with fixed masks.

Stage: recovery (after pruning). ``trainer.py`` (:class:`RecoveryTrainer`: resumable logit
distillation from the dense teacher) and ``masks.py`` (capture, enforce, verify).
"""

from pruning_core.recovery.masks import capture_masks, enforce_masks_, verify_masks
from pruning_core.recovery.trainer import RecoveryConfig, RecoveryTrainer, batch_indices

__all__ = ["RecoveryConfig", "RecoveryTrainer", "batch_indices", "capture_masks", "enforce_masks_", "verify_masks"]
