"""Ticket persistence (safetensors + JSON, no pickle) and crash/resume of a search."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from pruning_core.errors import ArtifactError, ConfigError, ShapeMismatch
from pruning_core.lottery import (
    CONTROLS,
    Early,
    LotteryTicketConfig,
    LotteryTicketPruner,
    TicketStore,
    WinningTicket,
    load_ticket,
    paths,
)
from pruning_core.vision import LeNet300100

T = 30


def _cfg(**kw) -> LotteryTicketConfig:
    base = dict(target_sparsity=0.7, pruning_rounds=3, training_steps=T, rewind_strategy=Early(5), seed=2)
    base.update(kw)
    return LotteryTicketConfig(**base)


def _same(a: WinningTicket, b: WinningTicket) -> None:
    assert a.round == b.round and a.rewind_step == b.rewind_step and a.config_hash == b.config_hash
    for group in ("masks", "rewind_weights", "trained_weights"):
        x, y = getattr(a, group), getattr(b, group)
        assert list(x) == list(y)
        assert all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x), group
    strip = lambda recs: [{**r.to_dict(), "metrics": {k: v for k, v in r.metrics.items() if k != "seconds"},  # noqa: E731
                           "controls": {c: {k: v for k, v in m.items() if k != "seconds"} for c, m in r.controls.items()}}
                          for r in recs]
    assert strip(a.records) == strip(b.records)


def test_save_load_round_trip_into_a_fresh_model(tmp_path, make_mlp, tiny_train_fn) -> None:
    pruner = LotteryTicketPruner(_cfg(pruning_rounds=2))
    ticket = pruner.find_ticket(make_mlp(), tiny_train_fn, controls=CONTROLS, progress=False)
    ticket.save(tmp_path / "t")
    loaded = WinningTicket.load(tmp_path / "t")
    _same(ticket, loaded)
    assert loaded.sparsity_history == ticket.sparsity_history and len(loaded.sparsity_history) == 2
    assert loaded.records[2].controls.keys() == set(CONTROLS)
    # Safetensors, not pickle: readable with safe_open, bool masks kept as bool.
    with safe_open(str(tmp_path / "t" / paths.TENSORS_FILE), "pt") as f:
        assert f.get_tensor("mask/fc1.weight").dtype == torch.bool
        assert set(k.split("/")[0] for k in f.keys()) == {"mask", "rewind", "trained"}
    meta = json.loads((tmp_path / "t" / paths.META_FILE).read_text())
    assert meta["round"] == 2 and meta["config"]["rewind_strategy"] == "early:5"
    # Into a fresh model: trained weights reproduce the ticket's network exactly.
    fresh = make_mlp(seed=99)
    pruner.apply_ticket(fresh, loaded, weights="trained")
    assert all(torch.equal(fresh.state_dict()[k], ticket.trained_weights[k]) for k in ticket.trained_weights)
    pruner.apply_ticket(fresh, loaded)  # default for weight rewinding: the rewind weights, masked
    assert torch.equal(fresh.fc1.weight.detach(), ticket.rewind_weights["fc1.weight"] * ticket.masks["fc1.weight"])


def test_loading_into_the_wrong_model_names_the_tensor(tmp_path, make_mlp, tiny_train_fn) -> None:
    pruner = LotteryTicketPruner(_cfg(pruning_rounds=1))
    ticket = pruner.find_ticket(make_mlp(), tiny_train_fn, progress=False)
    ticket.save(tmp_path)
    loaded = load_ticket(tmp_path)
    with pytest.raises(ConfigError, match="fc1.weight"):
        pruner.apply_ticket(LeNet300100(), loaded)
    wider = make_mlp()
    wider.fc2 = torch.nn.Linear(32, 17)
    with pytest.raises(ShapeMismatch, match="fc2.weight"):
        pruner.apply_ticket(wider, loaded)


def test_corrupt_or_incomplete_tickets(tmp_path, make_mlp, tiny_train_fn) -> None:
    ticket = LotteryTicketPruner(_cfg(pruning_rounds=1)).find_ticket(make_mlp(), tiny_train_fn, progress=False)
    d = tmp_path / "a"
    ticket.save(d)
    data = bytearray((d / paths.TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (d / paths.TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_ticket(d)
    with pytest.raises(ArtifactError, match="missing or interrupted"):
        load_ticket(tmp_path / "nothing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / paths.META_FILE).write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="not a"):
        load_ticket(tmp_path / "b")
    # Metadata that parses but is not a ticket's: ArtifactError (what TicketStore.latest skips), not KeyError.
    ticket.save(c := tmp_path / "c")
    good = json.loads((c / paths.META_FILE).read_text())
    broken = {
        "[1, 2]": "JSON list",
        json.dumps({k: v for k, v in good.items() if k != "records"}): "lacks",
        json.dumps({**good, "names": {"mask": good["names"]["mask"]}}): "rewind tensor names",
        "\udcff": "unreadable",
    }
    for text, message in broken.items():
        (c / paths.META_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ArtifactError, match=message):
            load_ticket(c)


class Crash(RuntimeError):
    pass


class CountingTrainFn:
    """Counts runs per (round, run kind); raises :class:`Crash` on a chosen run."""

    def __init__(self, inner, crash_at: tuple[int, str] | None = None) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, []

    def __call__(self, model, masks, spec):
        self.calls.append((spec.round_index, spec.run))
        if (spec.round_index, spec.run) == self.crash_at:
            raise Crash(f"injected crash in round {spec.round_index} ({spec.run})")
        return self.inner(model, masks, spec)


@pytest.mark.parametrize("crash_at", [(2, "imp"), (0, "imp"), (1, "random_mask"), (3, "random_reinit")])
def test_crash_in_round_r_resumes_at_round_r_with_identical_results(
    tmp_path, make_mlp, tiny_train_fn, crash_at
) -> None:
    cfg = _cfg()
    reference = LotteryTicketPruner(cfg).find_ticket(
        make_mlp(), tiny_train_fn, store=tmp_path / "ref", controls=CONTROLS, progress=False
    )
    store = TicketStore(tmp_path / "crashy")
    crashing = CountingTrainFn(tiny_train_fn, crash_at)
    with pytest.raises(Crash):
        LotteryTicketPruner(cfg).find_ticket(make_mlp(), crashing, store=store, controls=CONTROLS, progress=False)
    r = crash_at[0]
    assert store.completed_rounds() == list(range(r))  # rounds before the crash are committed

    resumed_fn = CountingTrainFn(tiny_train_fn)
    final = LotteryTicketPruner(cfg).find_ticket(
        make_mlp(), resumed_fn, store=store, controls=CONTROLS, progress=False
    )
    assert min(rnd for rnd, _ in resumed_fn.calls) == r  # no finished round is redone
    assert resumed_fn.calls[0] == (r, "imp")
    _same(final, reference)
    assert store.completed_rounds() == [0, 1, 2, 3]


def test_resume_with_another_config_is_refused(tmp_path, make_mlp, tiny_train_fn) -> None:
    LotteryTicketPruner(_cfg(pruning_rounds=1)).find_ticket(make_mlp(), tiny_train_fn, store=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="config hash"):
        LotteryTicketPruner(_cfg(pruning_rounds=2)).find_ticket(make_mlp(), tiny_train_fn, store=tmp_path, progress=False)


def test_completed_search_resumes_as_a_no_op(tmp_path, make_mlp, tiny_train_fn) -> None:
    cfg = _cfg(pruning_rounds=1)
    first = LotteryTicketPruner(cfg).find_ticket(make_mlp(), tiny_train_fn, store=tmp_path, progress=False)
    counting = CountingTrainFn(tiny_train_fn)
    model = make_mlp(seed=42)
    again = LotteryTicketPruner(cfg).find_ticket(model, counting, store=tmp_path, progress=False)
    assert counting.calls == []
    _same(first, again)
    assert torch.equal(model.fc1.weight.detach(), first.trained_weights["fc1.weight"])


def test_interrupted_save_is_ignored(tmp_path, make_mlp, tiny_train_fn) -> None:
    store = TicketStore(tmp_path)
    LotteryTicketPruner(_cfg(pruning_rounds=1)).find_ticket(make_mlp(), tiny_train_fn, store=store, progress=False)
    (tmp_path / "round_002").mkdir()
    (tmp_path / "round_002" / paths.TENSORS_FILE).write_bytes(b"partial")
    assert store.completed_rounds() == [0, 1] and store.latest().round == 1


def _break(directory, how: str) -> None:
    if how == "flipped tensor byte":
        data = bytearray((directory / paths.TENSORS_FILE).read_bytes())
        data[len(data) // 2] ^= 0x01
        (directory / paths.TENSORS_FILE).write_bytes(bytes(data))
    elif how == "garbled metadata":
        (directory / paths.META_FILE).write_bytes(b'{"format": "pruning_core.lottery.Winn\x00\xff')
    else:  # "tensors missing"
        (directory / paths.TENSORS_FILE).unlink()


@pytest.mark.parametrize("how", ["flipped tensor byte", "garbled metadata", "tensors missing"])
def test_corrupt_newest_round_falls_back_to_the_round_before_and_is_redone(
    tmp_path, make_mlp, tiny_train_fn, how, caplog
) -> None:
    cfg = _cfg()
    store = TicketStore(tmp_path)
    first = LotteryTicketPruner(cfg).find_ticket(make_mlp(), tiny_train_fn, store=store, controls=CONTROLS,
                                                 progress=False)
    older = {p: p.stat().st_mtime_ns for r in (0, 1, 2) for p in paths.round_dir(tmp_path, r).iterdir()}
    _break(paths.round_dir(tmp_path, 3), how)
    assert store.completed_rounds() == [0, 1, 2, 3]  # still committed: only loading reveals the damage

    with caplog.at_level(logging.WARNING, logger="pruning_core.lottery.store"):
        fallback = store.latest(config_hash=cfg.hashname())
    assert fallback is not None and fallback.round == 2
    assert "round 3 checkpoint" in caplog.text and "falling back" in caplog.text

    counting = CountingTrainFn(tiny_train_fn)
    final = LotteryTicketPruner(cfg).find_ticket(make_mlp(), counting, store=store, controls=CONTROLS,
                                                 progress=False)
    assert counting.calls == [(3, "imp"), (3, "random_reinit"), (3, "random_mask")]  # only the broken round
    _same(final, first)
    _same(load_ticket(paths.round_dir(tmp_path, 3)), first)  # rewritten, loads again
    assert all(p.stat().st_mtime_ns == t for p, t in older.items())  # the good rounds were not touched


def test_every_round_corrupt_restarts_and_a_foreign_config_is_still_refused(
    tmp_path, make_mlp, tiny_train_fn, caplog
) -> None:
    cfg = _cfg(pruning_rounds=1)
    store = TicketStore(tmp_path)
    LotteryTicketPruner(cfg).find_ticket(make_mlp(), tiny_train_fn, store=store, progress=False)
    _break(paths.round_dir(tmp_path, 1), "flipped tensor byte")
    with pytest.raises(ConfigError, match="config hash"):  # falls back to round 0, which is another search's
        store.latest(config_hash=_cfg(pruning_rounds=2).hashname())
    _break(paths.round_dir(tmp_path, 0), "tensors missing")
    with caplog.at_level(logging.WARNING, logger="pruning_core.lottery.store"):
        assert store.latest(config_hash=cfg.hashname()) is None
    assert "round 1 checkpoint" in caplog.text and "round 0 checkpoint" in caplog.text
    counting = CountingTrainFn(tiny_train_fn)
    LotteryTicketPruner(cfg).find_ticket(make_mlp(), counting, store=store, progress=False)
    assert counting.calls == [(0, "imp"), (1, "imp")] and store.latest().round == 1
