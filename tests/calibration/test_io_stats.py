"""pruning_core.io.stats: Parquet statistics and safetensors Hessians round trips and errors."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from pruning_core.calibration import collect_activation_stats
from pruning_core.errors import ArtifactError, ConfigError, MissingActivationStats
from pruning_core.io.stats import (
    load_activation_stats,
    load_hessian,
    load_layer_stats,
    read_stats_metadata,
    save_activation_stats,
    save_hessians,
)


@pytest.fixture
def ctx(tiny_llama):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return collect_activation_stats(tiny_llama, [ids], hessian=True, dataset="emma", progress=False)


def test_parquet_layout_and_round_trip(ctx, tmp_path):
    path = save_activation_stats(tmp_path / "stats.parquet", ctx, {"model": "tiny-llama", "config": "abc"})
    table = pq.read_table(path)
    assert table.schema.names == ["layer", "channel", "sum_sq", "sum_abs", "count"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "double", "double", "int64"]
    assert table.num_rows == sum(s.in_features for _, s in ctx)
    meta = read_stats_metadata(path)
    assert meta["model"] == "tiny-llama" and meta["pruning_core.num_samples"] == "2"
    back = load_activation_stats(path)
    assert back.layer_names() == ctx.layer_names() and back.dataset == "emma" and back.num_samples == 2
    for name, stats in ctx:
        got = back.require_stats(name)
        assert got.count == stats.count
        assert torch.equal(got.sum_sq, stats.sum_sq) and torch.equal(got.sum_abs, stats.sum_abs)


def test_filtered_read_of_one_layer(ctx, tmp_path):
    path = save_activation_stats(tmp_path / "s.parquet", ctx)
    name = "model.layers.1.mlp.down_proj"
    one = pq.read_table(path, filters=[("layer", "=", name)])
    assert set(one.column("layer").to_pylist()) == {name} and one.num_rows == 128
    stats = load_layer_stats(path, name)
    assert torch.equal(stats.sum_sq, ctx.require_stats(name).sum_sq) and stats.xtx is None
    with pytest.raises(MissingActivationStats):
        load_layer_stats(path, "model.layers.9.mlp.down_proj")


def test_hessians_round_trip(ctx, tmp_path):
    hpath = save_hessians(tmp_path / "h.safetensors", ctx, {"model": "tiny"})
    name = "model.layers.0.self_attn.q_proj"
    xtx, count = load_hessian(hpath, name)
    assert count == ctx.require_stats(name).count and torch.equal(xtx, ctx.require_stats(name).xtx)
    spath = save_activation_stats(tmp_path / "s.parquet", ctx)
    full = load_layer_stats(spath, name, hessian_path=hpath)
    torch.testing.assert_close(full.hessian, ctx.require_stats(name).hessian)
    with pytest.raises(MissingActivationStats):
        load_hessian(hpath, "nope")


def test_errors(ctx, tmp_path):
    with pytest.raises(ArtifactError):
        load_activation_stats(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ArtifactError):
        load_activation_stats(bad)
    with pytest.raises(ArtifactError):
        read_stats_metadata(bad)
    with pytest.raises(ArtifactError):
        load_hessian(tmp_path / "missing.safetensors", "x")
    badh = tmp_path / "bad.safetensors"
    badh.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ArtifactError):
        load_hessian(badh, "x")
    with pytest.raises(ConfigError):
        save_activation_stats(tmp_path / "s.parquet", ctx, {"model": 3})  # type: ignore[dict-item]
    no_h = collect_activation_stats(torch.nn.Linear(2, 2), [torch.ones(1, 2)], progress=False)
    with pytest.raises(ConfigError):
        save_hessians(tmp_path / "h.safetensors", no_h)


def test_failed_write_leaves_no_file(ctx, tmp_path, monkeypatch):
    import pruning_core.io.stats as mod

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.pq, "write_table", boom)
    with pytest.raises(OSError):
        save_activation_stats(tmp_path / "s.parquet", ctx)
    assert list(tmp_path.iterdir()) == []
