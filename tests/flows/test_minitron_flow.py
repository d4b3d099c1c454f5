"""The Minitron search end to end on a tiny random Llama: Prefect test server, SQLite MLflow store.

Asserts on what a user gets: the Parquet scores (and that they equal a direct computation),
each candidate's recorded loss (it is the loss of the model its plan builds), the ranking, the
chosen Hugging Face directory (reloads, generates, has the parameters the summary claims),
summary.json and the MLflow parent and child runs; resumption after a crash and on a rerun;
bad targets refused through ``prune run`` with exit code 2 and the field named.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient

from flows.cli import main as prune_main
from flows.jobs import parse_config
from flows.jobs import run_job as run_minitron
from flows.minitron import candidate_id
from flows.minitron.tasks import CANDIDATE_TAG, PROMPT
from flows.tracking import ROLE_TAG
from pruning_core.graph import StructuredPlan, apply_plan_
from pruning_core.io.manifest import Manifest
from pruning_core.io.tensors import load_tensors
from pruning_core.lm import generate_text, load_causal_lm, perplexity
from pruning_core.minitron import Architecture, compute_scores, lm_loss, trace_decoder

pytestmark = pytest.mark.flows

# The tiny Llama: 2 layers, hidden 64, MLP 128, 4 heads in 2 KV groups, 98,624 parameters.
# Under 75,000 (and over 60,000) with hidden 64 and 2 KV groups there are exactly four shapes:
# (layers, ffn, heads) = (2, 64, 4), (2, 64, 2), (2, 32, 4), (1, 128, 4).
JOB = {
    "job": "minitron",
    "name": "mn-test",
    "device": "cpu",
    "target": {"param_budget": 75000, "tolerance": 0.2, "hidden": 64, "kv_groups": 2},
    "divisibility": {"hidden": 16, "ffn": 32},
    "depth_criterion": "loss",
    "calibration": {"num_windows": 8, "window_length": 32, "batch_size": 4, "score_windows": 6, "loss_windows": 4,
                    "candidate_windows": 4},
    "evaluation": {"num_windows": 4, "window_length": 32, "batch_size": 4},
    "tracking": {"experiment": "minitron-tests"},
}
SHAPES = {(2, 64, 4), (2, 64, 2), (2, 32, 4), (1, 128, 4)}


def _job(model_dir, **changes):
    return parse_config({**JOB, "model": str(model_dir), **changes}, "test.yaml")


def _runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("minitron-tests").experiment_id])
    return ([r for r in runs if r.data.tags.get(ROLE_TAG) == "search"],
            [r for r in runs if r.data.tags.get(ROLE_TAG) == "candidate"])


@pytest.fixture(scope="module")
def search(prefect_server, tiny_model_dir_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("minitron")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    job = _job(tiny_model_dir_session)
    summary = run_minitron(job, root / "run")
    yield job, root / "run", summary, uri
    mp.undo()


def test_summary_ranks_every_candidate_and_keeps_the_best(search):
    job, run_dir, summary, _ = search
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["job_hash"] == job.job_hash() and summary["dense_parameters"] == 98_624
    cands = summary["candidates"]
    assert {(c["architecture"]["layers"], c["architecture"]["ffn"], c["architecture"]["heads"]) for c in cands} == SHAPES
    assert [c["rank"] for c in cands] == [1, 2, 3, 4]
    assert [c["loss"] for c in cands] == sorted(c["loss"] for c in cands)
    assert summary["architecture"] == cands[0]["architecture"] == min(cands, key=lambda c: c["loss"])["architecture"]
    assert set(summary["architecture"]) == {"layers", "hidden", "ffn", "heads", "kv_groups"}
    assert all(60_000 <= c["parameters"] <= 75_000 for c in cands)
    assert summary["parameters"] == cands[0]["parameters"]
    depth = next(c for c in cands if c["architecture"]["layers"] == 1)
    assert len(depth["removed_layers"]) == 1 and all(not c["removed_layers"] for c in cands if c is not depth)
    assert 1.0 < summary["perplexity_before"] < 1e4 and 1.0 < summary["perplexity_after"] < 1e4
    for stage in ("prepare", "evaluate_dense", "scores", "candidates", "rebuild", "evaluate_chosen", "speed", "log",
                  "total"):
        assert summary["seconds"][stage] >= 0.0, stage


def test_summary_reports_measured_speed_and_size_against_the_dense_model(search):
    """Issue 15: a Minitron model shows what it buys: tokens/s of the chosen and the dense model
    (same process, median of 3), their ratios, and the bytes on disk (smaller: fewer parameters)."""
    _, run_dir, summary, uri = search
    speed, size = summary["speed"], summary["size"]
    for model in ("dense", "output"):
        assert speed[model]["prefill_tokens_per_s"] > 0 and speed[model]["decode_tokens_per_s"] > 0
        assert speed[model]["repeats"] == 3
    assert speed["prefill_ratio"] == speed["output"]["prefill_tokens_per_s"] / speed["dense"]["prefill_tokens_per_s"]
    assert speed["decode_ratio"] > 0 and "smaller dense model" in speed["note"]
    assert json.loads((run_dir / "speed.json").read_text()) == speed
    assert 0 < size["output_bytes"] < size["input_bytes"] and size["ratio"] == size["output_bytes"] / size["input_bytes"]
    parent, _ = _runs(uri)
    assert parent[0].data.metrics["decode_speed_ratio"] == pytest.approx(speed["decode_ratio"])


def test_scores_parquet_schema_and_values(search, tiny_model_dir_session):
    job, run_dir, summary, _ = search
    table = pq.read_table(run_dir / "scores.parquet")
    assert table.schema.names == ["axis", "layer", "index", "score"]
    assert [f.type for f in table.schema] == [pa.string(), pa.int32(), pa.int32(), pa.float64()]
    meta = table.schema.metadata
    assert meta[b"seq_agg"] == b"mean" and meta[b"batch_agg"] == b"l2" and meta[b"num_tokens"] == b"192"  # 6 x 32
    assert meta[b"job_hash"].decode() == job.job_hash()
    rows = table.to_pydict()
    counts = {a: rows["axis"].count(a) for a in set(rows["axis"])}
    assert counts == {"layer_bi": 2, "layer_loss": 2, "hidden": 64, "neuron": 2 * 128, "head": 2 * 4}
    assert {lay for a, lay in zip(rows["axis"], rows["layer"], strict=True) if a == "hidden"} == {-1}
    # The same scores, computed directly on the run's windows, without the flow.
    model, _ = load_causal_lm(tiny_model_dir_session)
    windows = load_tensors(run_dir / "windows.safetensors", ["calibration"])["calibration"]
    _, structure = trace_decoder(model, windows[:1, :16])
    direct = compute_scores(model, list(windows[:6].split(4)), structure, loss_batches=list(windows[:4].split(4)))
    expected = pa.table(direct.to_columns()).to_pydict()
    mine = {(a, lay, i): s for a, lay, i, s in zip(*rows.values(), strict=True)}
    theirs = {(a, lay, i): s for a, lay, i, s in zip(*expected.values(), strict=True)}
    assert mine.keys() == theirs.keys()
    torch.testing.assert_close(torch.tensor([mine[k] for k in theirs]), torch.tensor(list(theirs.values())))


def test_candidate_losses_are_the_losses_of_their_plans(search, tiny_model_dir_session):
    _, run_dir, summary, _ = search
    windows = load_tensors(run_dir / "windows.safetensors", ["calibration"])["calibration"]
    for cand in summary["candidates"]:
        dense, _ = load_causal_lm(tiny_model_dir_session)
        plan = StructuredPlan.from_json((run_dir / "candidates" / cand["id"] / "plan.json").read_text())
        model = apply_plan_(dense, plan)
        assert sum(p.numel() for p in model.parameters()) == cand["parameters"]
        assert lm_loss(model, list(windows[:4].split(4))) == pytest.approx(cand["loss"], rel=1e-6)


def test_chosen_model_reloads_generates_and_has_the_claimed_size(search, tiny_model_dir_session):
    _, run_dir, summary, _ = search
    model, tok = load_causal_lm(run_dir / "model")
    arch = summary["architecture"]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (arch["layers"], arch["hidden"], arch["ffn"], arch["heads"], arch["kv_groups"])
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[0, : ids.shape[1]], ids[0])
    assert generate_text(model, tok, PROMPT, max_new_tokens=16) == summary["sample"]  # greedy: the flow's sample
    windows = load_tensors(run_dir / "windows.safetensors", ["evaluation"])["evaluation"]
    assert perplexity(model, windows, batch_size=4, progress=False) == pytest.approx(summary["perplexity_after"])
    dense, _ = load_causal_lm(tiny_model_dir_session)
    assert perplexity(dense, windows, batch_size=4, progress=False) == pytest.approx(summary["perplexity_before"])


def test_mlflow_parent_and_one_child_per_candidate(search):
    job, _, summary, uri = search
    parents, children = _runs(uri)
    assert [p.info.run_id for p in parents] == [summary["mlflow_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["chosen"] == summary["chosen"]
    assert parent.data.metrics["parameters"] == summary["parameters"]
    assert parent.data.metrics["perplexity_after"] == pytest.approx(summary["perplexity_after"])
    assert parent.data.params["depth_criterion"] == "loss"
    by_id = {c["id"]: c for c in summary["candidates"]}
    assert sorted(c.data.tags[CANDIDATE_TAG] for c in children) == sorted(by_id)
    for child in children:
        cand = by_id[child.data.tags[CANDIDATE_TAG]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.metrics["loss"] == pytest.approx(cand["loss"])
        assert child.data.metrics["parameters"] == cand["parameters"]
        assert {k: int(child.data.params[k]) for k in cand["architecture"]} == cand["architecture"]
        assert child.data.tags["rank"] == str(cand["rank"])
    client = MlflowClient(uri)
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "config.json", "scores.parquet", "model", "figures", "tables"} <= files
    assert "model/model.safetensors" in {f.path for f in client.list_artifacts(parent.info.run_id, "model")}


def test_rerun_reuses_scores_and_candidates_without_duplicate_runs(search, monkeypatch):
    job, run_dir, summary, uri = search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import flows.llm as llm
    import flows.minitron.tasks as tasks

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    for name in ("compute_scores", "evaluate_candidate", "save_pretrained_atomic", "trace_decoder"):
        monkeypatch.setattr(tasks, name, forbidden)
    monkeypatch.setattr(llm, "streaming_perplexity", forbidden)
    scores_mtime = (run_dir / "scores.parquet").stat().st_mtime_ns
    again = run_minitron(job, run_dir)
    assert (run_dir / "scores.parquet").stat().st_mtime_ns == scores_mtime
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}
    parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == len(summary["candidates"])


def test_crash_between_candidates_resumes_without_redoing_finished_ones(prefect_server, mlflow_uri,
                                                                       tiny_model_dir_session, tmp_path, monkeypatch):
    import flows.minitron.tasks as tasks

    job = _job(tiny_model_dir_session, depth_criterion="bi_iterative", runner={"kind": "threads", "max_workers": 1},
               evaluation={**JOB["evaluation"], "enabled": False, "speed": False})
    real, calls = tasks.evaluate_candidate, []

    def crash_on_third(model, *args, **kwargs):
        calls.append(candidate_id(Architecture.from_config(model.config)))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_candidate", crash_on_third)
    with pytest.raises(Exception, match="simulated crash"):
        run_minitron(job, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    finished = {n.removeprefix("candidate:") for n in Manifest(tmp_path / "run").entries() if n.startswith("candidate:")}
    assert calls[2] not in finished and len(finished) >= 2  # the crashed candidate left no result
    parents, children = _runs(mlflow_uri)
    assert parents[0].info.status == "FAILED" and len(children) == len(finished)
    rerun: list[int] = []
    monkeypatch.setattr(tasks, "evaluate_candidate", lambda m, *a, **k: (rerun.append(1), real(m, *a, **k))[1])
    monkeypatch.setattr(tasks, "compute_scores", lambda *a, **k: pytest.fail("scores recomputed after the crash"))
    summary = run_minitron(job, tmp_path / "run")
    assert len(rerun) == 4 - len(finished)  # only the crashed (and any never-started) candidate
    assert {c["id"] for c in summary["candidates"]} >= finished and len(summary["candidates"]) == 4
    assert summary["perplexity_before"] is None and summary["perplexity_after"] is None
    parents, children = _runs(mlflow_uri)
    assert [p.info.run_id for p in parents] == [summary["mlflow_run_id"]] and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags[CANDIDATE_TAG] for c in children) == sorted(c["id"] for c in summary["candidates"])
    depth = next(c for c in summary["candidates"] if c["architecture"]["layers"] == 1)
    order = json.loads(pq.read_table(tmp_path / "run" / "scores.parquet").schema.metadata[b"bi_iterative_order"])
    assert depth["removed_layers"] == order[:1]


BAD_AT_VALIDATION = [
    ({"heads": [3], "kv_groups": [2]}, "target.heads", "not a multiple of num_key_value_heads 2"),
    ({"hidden": [50]}, "target.hidden", "multiples of 16"),
    ({"param_fraction": 1.5, "param_budget": None}, "target.param_fraction", "less than or equal to 1"),
    ({"param_budget": None, "hidden": None, "kv_groups": None}, "target.param_budget", "at least one explicit axis"),
]
BAD_AT_PREPARE = [
    ({"layers": [3], "param_budget": None}, "target.layers", "above the original 2"),
    ({"ffn": [256], "param_budget": None}, "target.ffn", "above the original 128"),
    ({"layers": [1], "min_layers": 2, "param_budget": None}, "target.layers", "keep min_layers 2"),
    ({"param_budget": 1000}, "target", "no architecture satisfies"),
]


def _write(tmp_path, model_dir, target_changes) -> str:
    target = {k: v for k, v in {**JOB["target"], **target_changes}.items() if v is not None}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**JOB, "model": str(model_dir), "target": target}))
    return str(config)


@pytest.mark.parametrize(("change", "field", "fragment"), BAD_AT_VALIDATION, ids=[f for _, f, _ in BAD_AT_VALIDATION])
def test_prune_run_rejects_bad_targets_before_running(change, field, fragment, tiny_model_dir_session, tmp_path,
                                                      capsys):
    config = _write(tmp_path, tiny_model_dir_session, change)
    assert prune_main(["run", config, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prune: error: Invalid config field") and field in err and fragment in err
    assert not (tmp_path / "out").exists()


def test_prune_run_rejects_targets_the_model_cannot_meet(prefect_server, mlflow_uri, tiny_model_dir_session, tmp_path,
                                                         capsys):
    for i, (change, field, fragment) in enumerate(BAD_AT_PREPARE):
        out = tmp_path / f"out{i}"
        assert prune_main(["run", _write(tmp_path, tiny_model_dir_session, change), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"'{field}'" in err and fragment in err, err
        assert not (out / "scores.parquet").exists() and not (out / "windows.safetensors").exists()


def _prepared(job, run_dir):
    import flows.minitron.tasks as tasks

    inputs = tasks.prepare_inputs.fn(job, str(run_dir))
    tasks.compute_importance.fn(job, str(run_dir), inputs)
    return inputs


@pytest.mark.parametrize("criterion", ["loss_block", "loss_iterative"])
def test_new_depth_criteria_run_through_the_tasks(criterion, tiny_model_dir_session, tmp_path):
    """loss_block / loss_iterative: scores (block losses or the greedy order) computed once, then
    every candidate's removed layers follow from them (here: the 1-layer candidate drops the layer
    whose removal costs least on the loss windows)."""
    import flows.minitron.tasks as tasks

    job = _job(tiny_model_dir_session, depth_criterion=criterion, evaluation={**JOB["evaluation"], "enabled": False})
    inputs = _prepared(job, tmp_path)
    table = pq.read_table(tmp_path / "scores.parquet")
    rows, meta = table.to_pydict(), table.schema.metadata
    model, _ = load_causal_lm(tiny_model_dir_session)
    windows = load_tensors(tmp_path / "windows.safetensors", ["calibration"])["calibration"]
    base = lm_loss(model, [windows[:4]])
    drops = [lm_loss(apply_plan_(load_causal_lm(tiny_model_dir_session)[0], StructuredPlan.from_dict(
        {"layer_removals": [{"container": "model.layers", "size": 2, "indices": [i]}],
         "config": {"num_hidden_layers": 1}})), [windows[:4]]) - base for i in range(2)]
    best = int(torch.tensor(drops).argmin())
    if criterion == "loss_block":
        block = [(lay, i, s) for a, lay, i, s in zip(*rows.values(), strict=True) if a == "block_loss"]
        assert [(lay, i) for lay, i, _ in block] == [(0, 1), (1, 1)] and "layer_loss" not in rows["axis"]
        got = torch.tensor([s for *_, s in block], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(drops, dtype=torch.float64), rtol=0, atol=1e-5)
    else:
        assert json.loads(meta[b"loss_iterative_order"]) == [best]
    depth = next(c for c in inputs["candidates"] if c["architecture"]["num_layers"] == 1)
    plan = tasks.make_plan(job, str(tmp_path), model, Architecture(**depth["architecture"]))
    assert plan.layer_removals[0].indices == (best,)


def test_distillation_uses_windows_disjoint_from_the_candidate_windows(tiny_model_dir_session, tmp_path, monkeypatch):
    import flows.minitron.tasks as tasks
    from pruning_core.lm import load_text, tokenize_corpus
    from pruning_core.minitron import window_positions

    job = _job(tiny_model_dir_session, distillation={"steps": 2, "windows": 3, "seed": 5},
               evaluation={**JOB["evaluation"], "enabled": False})
    inputs = _prepared(job, tmp_path)
    windows = load_tensors(tmp_path / "windows.safetensors", ["calibration", "distillation"])
    scoring, distill = windows["calibration"][:4], windows["distillation"]
    assert distill.shape == (3, 32)
    # token positions in the calibration text: no distillation window touches a scoring window
    _, tokenizer = load_causal_lm(tiny_model_dir_session)
    tokens = tokenize_corpus(tokenizer, load_text("emma"))

    def covered(rows):
        spans = set()
        for row in rows:
            found = window_positions(tokens, row)
            assert found.numel() >= 1
            spans |= {int(s) + j for s in found for j in range(row.numel())}
        return spans

    assert not covered(distill) & covered(scoring)
    # the candidate task distils on those windows and scores on the candidate windows
    seen = {}
    real = tasks.evaluate_candidate

    def spy(model, batches, **kwargs):
        seen["scoring"], seen["distill"] = torch.cat(batches), torch.cat(kwargs["distill_batches"])
        return real(model, batches, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_candidate", spy)
    result = tasks.score_candidate.fn(job, str(tmp_path), inputs, inputs["candidates"][0])
    assert torch.equal(seen["scoring"], scoring) and torch.equal(seen["distill"], distill)
    assert len(result["distill_losses"]) == 2
