"""The per-layer figure: reconstruction error by depth, one coloured line per module type; sparsity
only where it varies (a uniform target is not drawn as a wall of identical bars)."""

from __future__ import annotations

import pytest

from flows.report import depth_of, layer_figure, module_type

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layers(blocks: int, sparsity=lambda i, t: 0.5) -> list[dict]:
    return [{"name": f"model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}", "shape": [8, 8],
             "sparsity": sparsity(i, t), "reconstruction_error": 0.01 * (i + 1) * (1 + TYPES.index(t))}
            for i in range(blocks) for t in TYPES]


@pytest.mark.parametrize("name, kind, depth", [
    ("model.layers.3.mlp.up_proj", "up_proj", 3), ("model.layers.12.self_attn.q_proj", "q_proj", 12),
    ("model.layers.0.mlp.experts.down_proj.3", "down_proj", 0), ("transformer.h.5.attn.c_attn", "c_attn", 5),
    ("lm_head", "lm_head", 0),
])
def test_module_type_and_depth(name, kind, depth):
    assert module_type(name) == kind and depth_of(name) == depth


def test_uniform_sparsity_gives_one_error_panel_with_the_module_types(tmp_path):
    fig = layer_figure(_layers(4), "wanda 50%")
    assert len(fig.axes) == 1  # no sparsity panel: every layer has the target sparsity
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == TYPES
    assert len({tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                for line in ax.get_lines()}) == len(TYPES)  # coloured apart
    assert all(list(line.get_xdata()) == [0, 1, 2, 3] for line in ax.get_lines())  # by depth
    down = ax.get_lines()[TYPES.index("down_proj")]
    assert list(down.get_ydata()) == pytest.approx([0.07 * (i + 1) for i in range(4)])
    out = tmp_path / "layers.png"
    fig.savefig(out)
    assert out.stat().st_size > 10_000


def test_varying_sparsity_gets_its_own_panel():
    fig = layer_figure(_layers(3, sparsity=lambda i, t: 0.4 + 0.1 * i), "OWL")
    assert [ax.get_ylabel() for ax in fig.axes] == ["relative output error", "sparsity"]
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == TYPES


def test_without_errors_the_sparsity_is_drawn():
    layers = [{k: v for k, v in r.items() if k != "reconstruction_error"} for r in _layers(2)]
    fig = layer_figure(layers, "no errors")
    assert [ax.get_ylabel() for ax in fig.axes] == ["sparsity"]
