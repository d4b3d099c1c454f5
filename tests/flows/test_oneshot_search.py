"""The one-shot job's ``allocation: {kind: search}`` stage end to end on a tiny 3-block Llama whose
block 1 writes most into the residual stream (pruning it hurts most): the search runs on the
job's task runner, its allocation averages the target exactly on the level grid, gives block 1
the lowest sparsity, drives the pruning, is logged per generation; a killed search resumes
without evaluating finished generations again and ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from flows.jobs import run_job
from flows.oneshot import search as search_stage
from flows.tracking import ROLE_TAG
from pruning_core.allocation import Allocation
from pruning_core.allocation.search import LevelGrid
from pruning_core.io import paths
from pruning_core.io.masks import load_masks
from tests.conftest import TINY_VOCAB, make_tiny_llama
from tests.flows.oneshot_helpers import tiny_job

pytestmark = pytest.mark.flows
S, STEP, LEVELS, GENERATIONS = 0.5, 0.1, 2, 4
SEARCH = {"kind": "search", "m": 3.0, "granularity": "block", "generations": GENERATIONS, "offspring": 6,
          "survivors": 2, "level_step": STEP, "max_level": LEVELS, "fitness_windows": [2, 4]}
SENSITIVE = 1


@pytest.fixture(scope="module")
def sensitive_model_dir(tmp_path_factory, tiny_tokenizer):
    """3 blocks; the output projections of every block but block 1 scaled by 0.3, so block 1 writes
    most into the residual stream (brute force over the 19 candidates: block 1 at level -2 is best)."""
    model = make_tiny_llama(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                            num_hidden_layers=3)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            if i != SENSITIVE:
                block.self_attn.o_proj.weight.mul_(0.3)
                block.mlp.down_proj.weight.mul_(0.3)
    out = tmp_path_factory.mktemp("sensitive-llama")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _job(model_dir, name="search"):
    return tiny_job(model_dir, method="wanda", sparsity=S, allocation=SEARCH, name=name,
                    evaluation={"enabled": False, "speed": False})


@pytest.fixture(scope="module")
def search_run(prefect_server, sensitive_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    summary = run_job(_job(sensitive_model_dir), root / "run")
    yield root / "run", summary, f"sqlite:///{root / 'mlflow.db'}"
    mp.undo()


def _allocation(run_dir) -> Allocation:
    return Allocation.from_dict(json.loads(paths.allocation(run_dir).read_text()))


def test_search_allocation_averages_the_target_on_the_grid_and_drives_pruning(search_run):
    run_dir, summary, _ = search_run
    allocation = _allocation(run_dir)
    assert allocation.source == "search" and [u.name for u in allocation.units] == [f"model.layers.{i}" for i in range(3)]
    assert allocation.mean == pytest.approx(S, abs=1e-12)
    saved = json.loads(paths.search_state(run_dir).read_text())
    grid, levels = LevelGrid.from_dict(saved["grid"]), saved["state"]["parent"]
    assert grid.step_params == round(STEP * allocation.units[0].num_params) and grid.max_level == LEVELS
    assert sum(levels) == 0 and all(abs(lv) <= LEVELS for lv in levels)
    assert allocation.sparsities == tuple(grid.sparsity(u, lv) for u, lv in enumerate(levels))
    assert summary["allocation"]["search"] == {"generations": GENERATIONS, "levels": levels, "state": str(
        paths.search_state(run_dir)), "best_fitness": saved["state"]["parent_fitness"]}
    targets = json.loads(paths.allocation_targets(run_dir).read_text())["targets"]
    masks = load_masks(paths.masks(run_dir))
    for name, target in targets.items():  # the found allocation drove the per-layer pruning
        assert 1.0 - float(masks[name].float().mean()) == pytest.approx(target, abs=1e-12), name
    assert summary["sparsity"] == pytest.approx(S, abs=1.0 / 64)


def test_search_gives_the_sensitive_block_the_lowest_sparsity(search_run):
    sparsities = _allocation(search_run[0]).sparsities
    assert sparsities[SENSITIVE] < min(s for i, s in enumerate(sparsities) if i != SENSITIVE), sparsities


def test_search_logs_a_child_run_per_generation_and_the_allocation(search_run):
    run_dir, summary, uri = search_run
    client = MlflowClient(uri)
    parent = summary["mlflow_run_id"]
    children = [r for r in client.search_runs([client.get_run(parent).info.experiment_id],
                                              f"tags.`mlflow.parentRunId` = '{parent}'")
                if r.data.tags.get(ROLE_TAG) == "search-generation"]
    assert sorted(r.info.run_name for r in children) == [f"generation-{g}" for g in range(1, GENERATIONS + 1)]
    history = json.loads(paths.search_state(run_dir).read_text())["state"]["history"]
    best = {r.info.run_name: r.data.metrics["best_fitness"] for r in children}
    assert [best[f"generation-{g}"] for g, _ in history] == pytest.approx([f for _, f in history])
    assert all(a >= b for (_, a), (_, b) in zip(history, history[1:], strict=False))  # elitism: never worse
    logged = {a.path for a in client.list_artifacts(parent, "allocation")}
    assert logged == {"allocation/allocation.json", "allocation/allocation.png"}
    assert paths.allocation_figure(run_dir).read_bytes()[:4] == b"\x89PNG"


def test_killed_search_resumes_without_repeating_generations(search_run, sensitive_model_dir, mlflow_uri,
                                                              tmp_path, monkeypatch):
    crash_at, evaluated, built = 2, [], []
    real_evaluate, real_build = search_stage._evaluate_chunk, search_stage.build_variant

    def evaluate(job, run_dir, model_dir, generation, stage, candidates):
        evaluated.append(generation)
        if crash_at is not None and generation == crash_at:
            raise RuntimeError("injected crash")
        return real_evaluate(job, run_dir, model_dir, generation, stage, candidates)

    monkeypatch.setattr(search_stage, "_evaluate_chunk", evaluate)
    monkeypatch.setattr(search_stage, "build_variant", lambda *a, **k: built.append(1) or real_build(*a, **k))
    with pytest.raises(RuntimeError, match="injected crash"):
        run_job(_job(sensitive_model_dir), tmp_path / "run")
    saved = json.loads(paths.search_state(tmp_path / "run").read_text())["state"]
    assert saved["generation"] == crash_at and max(evaluated) == crash_at and built
    evaluated.clear()
    built.clear()
    crash_at = None
    summary = run_job(_job(sensitive_model_dir), tmp_path / "run")
    assert min(evaluated) == 2, "finished generations were evaluated again"
    assert not built, "the database was rebuilt"
    reference = json.loads(paths.search_state(search_run[0]).read_text())
    assert json.loads(paths.search_state(tmp_path / "run").read_text()) == reference
    assert _allocation(tmp_path / "run").sparsities == _allocation(search_run[0]).sparsities
    client = MlflowClient(mlflow_uri)
    children = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    assert sorted(r.info.run_name for r in children) == [f"generation-{g}" for g in range(1, GENERATIONS + 1)]


def test_candidates_are_split_into_ordered_chunks_one_per_worker():
    assert search_stage.chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert search_stage.chunks([1, 2], 4) == [[1], [2]]
