"""The one-shot job's recovery stage: fixed-mask logit distillation of the pruned model from the
dense one (issue 16 §2; :class:`pruning_core.recovery.RecoveryTrainer`).

    recovery: {steps: 200, lr: 1e-4, windows: 64, batch_size: 4, checkpoint_every: 25}

Runs after ``assemble`` (the pruned model and the masks are in the run directory) and before the
sparse export and the pruned evaluation: the recovered model *replaces* the run's ``model/``, so
everything after it (export, perplexity, MLflow model) sees the recovered weights.

Memory: unlike the streaming stages, this one holds the student *and* the dense teacher in
memory, with the student's gradients and AdamW state (training needs whole-model forward and
backward passes): about 4x the model's size plus activations.

Data: ``recovery.windows`` windows of the calibration text (``windows.safetensors`` entry
``recovery``, cut by :func:`flows.llm.prepare_windows`) sharing no token with the calibration
windows; the evaluation text is another text (checked by the config).

Precision: the models train in their stored dtype (bf16 models with float32 master weights, see
the trainer). Masks: the run's ``masks.safetensors``, enforced after every step and verified at
the end (:meth:`RecoveryTrainer.verify`). Resuming: the trainer's state is checkpointed to
``recovery/trainer.pt`` every ``checkpoint_every`` steps and recorded in the manifest; a killed
job resumes at that step, with the same batches, so no step runs twice.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from prefect import task

from flows import llm
from flows.execution import IO_TASK
from flows.oneshot.config import OneShotJob
from flows.oneshot.quality import RecoverySection
from flows.tracking import Tracker
from pruning_core.io import paths
from pruning_core.io.atomic import atomic_path, atomic_write_text
from pruning_core.io.manifest import Manifest
from pruning_core.io.masks import load_masks
from pruning_core.lm import save_pretrained_atomic
from pruning_core.recovery import RecoveryConfig, RecoveryTrainer

log = logging.getLogger(__name__)
WINDOWS = "recovery"  # the windows.safetensors entry of the training windows
METRIC = "recovery_loss"


def recovery_windows(job: OneShotJob) -> llm.DisjointWindows | None:
    """The training windows :func:`flows.llm.prepare_windows` cuts for a job with recovery (else None):
    ``recovery.windows`` windows of the calibration text avoiding every calibration window."""
    if job.recovery is None:
        return None
    return llm.DisjointWindows(WINDOWS, job.recovery.windows, seed=job.calibration.seed + 1,
                               avoid=job.calibration.num_windows)


def trainer_config(section: RecoverySection) -> RecoveryConfig:
    """The library's :class:`RecoveryConfig` of a job's ``recovery`` section."""
    return RecoveryConfig(steps=section.steps, lr=section.lr, batch_size=section.batch_size,
                          warmup_steps=section.warmup_steps, schedule=section.schedule,
                          temperature=section.temperature, lm_weight=section.lm_weight, seed=section.seed)


def checkpoint(run_dir: str, trainer: RecoveryTrainer) -> None:
    """Write the trainer's state atomically and record it (the step a killed job resumes at)."""
    with atomic_path(paths.recovery_state(run_dir)) as tmp:
        torch.save(trainer.state_dict(), tmp)
    Manifest(run_dir).record("recovery_state", paths.recovery_state(run_dir), kind="checkpoint")
    log.info("recovery: checkpoint at step %d", trainer.step)


def make_trainer(job: OneShotJob, run_dir: str, inputs: dict[str, Any]) -> tuple[RecoveryTrainer, Any]:
    """The trainer on the run's pruned model (student), the dense model (teacher) and the run's masks,
    resumed from the last checkpoint if one is recorded; and the student's tokenizer."""
    student, tokenizer = llm.load_model(str(paths.model(run_dir)), job.device)
    teacher, _ = llm.load_model(inputs["model_dir"], job.device)
    trainer = RecoveryTrainer(student, teacher, llm.load_windows(run_dir, WINDOWS), trainer_config(job.recovery),
                              masks=load_masks(paths.masks(run_dir)))
    if Manifest(run_dir).is_complete("recovery_state"):
        trainer.load_state_dict(torch.load(paths.recovery_state(run_dir), weights_only=True))
        log.info("recovery: resuming at step %d of %d", trainer.step, trainer.config.steps)
    return trainer, tokenizer


def loss_figure(losses: list[float], title: str) -> Any:
    """Distillation loss (KL to the dense model) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_title(title)
    return fig


def _finish(job: OneShotJob, run_dir: str, trainer: RecoveryTrainer, tokenizer: Any) -> dict[str, Any]:
    """Verify the masks, install the recovered model as the run's model, write the curve and figure."""
    pruned = trainer.verify()
    save_pretrained_atomic(trainer.student, tokenizer, paths.model(run_dir),
                           extra={"pruning": {"job_hash": job.job_hash(), "method": job.method, "pattern": job.pattern,
                                              "sparsity": job.target_sparsity, "recovery_steps": trainer.step}})
    curve = {"steps": trainer.step, "losses": trainer.losses, "pruned_weights": pruned}
    fig = loss_figure(trainer.losses, f"{job.name}: recovery distillation ({trainer.step} steps)")
    with atomic_path(paths.recovery_figure(run_dir)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    atomic_write_text(paths.recovery_curve(run_dir), json.dumps(curve))
    manifest = Manifest(run_dir)
    manifest.record("model", paths.model(run_dir), kind="model")
    manifest.record("recovery_figure", paths.recovery_figure(run_dir), kind="figure")
    manifest.record("recovery", paths.recovery_curve(run_dir), kind="json")
    return curve


def _log(job: OneShotJob, run_dir: str, run_id: str, losses: list[float]) -> None:
    tracker = Tracker(job.tracking.tracking_uri, job.tracking.experiment)
    tracker.log_metrics_once(run_id, [(METRIC, loss, step) for step, loss in enumerate(losses, start=1)])
    if not tracker.has_artifact(run_id, "recovery/loss.png"):
        tracker.log_artifact(run_id, paths.recovery_figure(run_dir), "recovery")


def recovery_summary(job: OneShotJob, run_dir: str) -> dict[str, Any]:
    """``{"recovery": ...}`` for summary.json: steps, first and last loss, the curve's file (None: no recovery)."""
    if job.recovery is None:
        return {"recovery": None}
    curve = json.loads(paths.recovery_curve(run_dir).read_text())
    return {"recovery": {"steps": curve["steps"], "loss_first": curve["losses"][0], "loss_last": curve["losses"][-1],
                         "pruned_weights": curve["pruned_weights"], "curve": str(paths.recovery_curve(run_dir))}}


@task(name="recover", **IO_TASK)
def recover(job: OneShotJob, run_dir: str, inputs: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Distil the dense model into the pruned one with its masks fixed; the recovered model replaces
    ``model/``. Returns ``{"steps", "losses", "pruned_weights"}`` (also in ``recovery/curve.json``)."""
    if Manifest(run_dir).is_complete("recovery"):
        curve = json.loads(paths.recovery_curve(run_dir).read_text())
    else:
        trainer, tokenizer = make_trainer(job, run_dir, inputs)
        every = job.recovery.checkpoint_every

        def on_step(step: int, _loss: float, t: RecoveryTrainer) -> None:
            if step % every == 0 and step < t.config.steps:
                checkpoint(run_dir, t)

        trainer.train(callback=on_step, progress=True)
        checkpoint(run_dir, trainer)
        curve = _finish(job, run_dir, trainer, tokenizer)
    _log(job, run_dir, run_id, curve["losses"])
    return curve


__all__ = ["checkpoint", "loss_figure", "make_trainer", "recover", "recovery_summary", "recovery_windows", "trainer_config"]
