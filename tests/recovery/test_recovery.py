"""Recovery distillation: masks and N:M structure survive exactly, training helps, a resumed run is
bit-identical to an uninterrupted one, bf16 models train on float32 masters."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pruning_core.calibration.capture import collect_activation_stats
from pruning_core.errors import ConfigError, InvalidMask
from pruning_core.methods import get_method
from pruning_core.minitron.loss import lm_loss
from pruning_core.pruning import prune_module
from pruning_core.recovery import RecoveryConfig, RecoveryTrainer, batch_indices, capture_masks, verify_masks
from tests.conftest import make_tiny_llama


def _pruned(pattern: str, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    teacher = make_tiny_llama(num_hidden_layers=2)
    windows = torch.randint(0, teacher.config.vocab_size, (8, 16), generator=generator)
    student = copy.deepcopy(teacher)
    ctx = collect_activation_stats(student, list(windows.split(4)), progress=False)
    wanda = get_method("wanda")
    prune_module(student, wanda, wanda.spec(None if ":" in pattern else 0.5, pattern), ctx, measure_memory=False)
    return teacher.to(dtype), student.to(dtype), windows


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_and_nm_structure_survive_training_exactly(pattern, generator):
    teacher, student, windows = _pruned(pattern, generator)
    masks = capture_masks(student)
    before = {n: student.get_submodule(n).weight.detach().clone() for n in masks}
    kl_before = lm_loss(student, list(windows.split(4)))
    trainer = RecoveryTrainer(student, teacher, windows,
                              RecoveryConfig(steps=12, lr=3e-3, batch_size=4, schedule="constant", weight_decay=0.1))
    seen = []
    trainer.train(callback=lambda step, loss, t: seen.append(verify_masks(t.student, t.masks)))
    assert len(seen) == 12 and len(set(seen)) == 1  # every pruned weight zero after every step
    assert trainer.verify() == sum(int((~m).sum()) for m in masks.values())
    for name, mask in masks.items():
        weight = student.get_submodule(name).weight.detach()
        assert torch.all(weight[~mask] == 0)
        assert not torch.equal(weight[mask], before[name][mask])  # the kept weights did train
        if pattern == "2:4":  # every group of 4 inputs still has at least 2 zeros
            assert bool(((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all())
    assert trainer.losses[-1] < trainer.losses[0]
    assert lm_loss(student, list(windows.split(4))) != kl_before


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, generator):
    teacher, student, windows = _pruned("unstructured", generator)
    config = RecoveryConfig(steps=6, lr=1e-3, batch_size=3, warmup_steps=2, schedule="cosine", lm_weight=0.5)
    whole_student = copy.deepcopy(student)
    whole = RecoveryTrainer(whole_student, teacher, windows, config)
    whole.train()

    first_student = copy.deepcopy(student)
    first = RecoveryTrainer(first_student, teacher, windows, config)
    first.train(until=4)
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")  # killed after the step-4 checkpoint
    resumed_student = copy.deepcopy(student)  # a fresh process rebuilds the pruned model
    resumed = RecoveryTrainer(resumed_student, teacher, windows, config)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    resumed.train()
    assert resumed.step == whole.step == 6 and resumed.losses == whole.losses
    for (name, a), b in zip(whole_student.state_dict().items(), resumed_student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="another config"):
        RecoveryTrainer(copy.deepcopy(student), teacher, windows,
                        RecoveryConfig(steps=7)).load_state_dict(first.state_dict())


def test_bf16_model_trains_on_float32_masters(generator):
    teacher, student, windows = _pruned("unstructured", generator, torch.bfloat16)
    trainer = RecoveryTrainer(student, teacher, windows, RecoveryConfig(steps=3, lr=1e-2, batch_size=2))
    assert all(m.dtype == torch.float32 for m in trainer.master.values())
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    trainer.verify()
    name = next(iter(trainer.masks))
    master = trainer.master[f"{name}.weight"]
    assert torch.equal(student.get_submodule(name).weight, master.to(torch.bfloat16))


def test_verify_catches_a_nonzero_pruned_weight(generator):
    teacher, student, windows = _pruned("unstructured", generator)
    masks = capture_masks(student)
    name, mask = next(iter(masks.items()))
    index = tuple(int(i) for i in (~mask).nonzero()[0])
    with torch.no_grad():
        student.get_submodule(name).weight[index] = 1.0
    with pytest.raises(InvalidMask, match=name):
        verify_masks(student, masks)


def test_schedule_batches_and_config_validation():
    cfg = RecoveryConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    assert [cfg.lr_at(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cfg.lr_at(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert RecoveryConfig(steps=4, lr=2.0, schedule="linear", min_lr_ratio=0.5).lr_at(2) == pytest.approx(1.5)
    epoch = torch.cat([batch_indices(10, 5, s, seed=1) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # each window once per epoch
    assert torch.equal(batch_indices(10, 5, 1, seed=1), batch_indices(10, 5, 1, seed=1))
    for bad in ({"steps": -1}, {"steps": 5, "lr": 0.0}, {"steps": 5, "warmup_steps": 6},
                {"steps": 5, "schedule": "step"}, {"steps": 5, "grad_clip": 0.0}):
        with pytest.raises(ConfigError):
            RecoveryConfig(**bad)
