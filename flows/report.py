"""Figures and tables for MLflow and Prefect: what people would rather look at than read."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


DEPTH = re.compile(r"\.(\d+)\.")
UNIFORM_TOLERANCE = 1e-3


def module_type(name: str) -> str:
    """The kind of a prunable layer from its name: ``model.layers.3.mlp.up_proj`` -> ``up_proj``
    (an expert's index is dropped: ``...experts.down_proj.3`` -> ``down_proj``)."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def depth_of(name: str) -> int:
    """The decoder block a layer sits in (the first index in its name; 0 when it has none)."""
    found = DEPTH.search(f".{name}.")
    return int(found.group(1)) if found else 0


def _by_type(layers: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """``{module type: [(depth, value), ...]}`` in model order, rows without a value left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in layers:
        if r.get(key) is not None:
            series.setdefault(module_type(str(r["name"])), []).append((depth_of(str(r["name"])), float(r[key])))
    return series


def _plot_series(ax: Any, series: dict[str, list[tuple[int, float]]], ylabel: str) -> None:
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for i, (kind, points) in enumerate(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colours(i % 10), label=kind)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="module", fontsize=7, ncol=2, loc="best")


def layer_figure(layers: Sequence[Mapping[str, Any]], title: str):
    """Relative output reconstruction error ``||WX - W'X|| / ||WX||`` by depth, one line per module
    type (q/k/v/o/gate/up/down coloured apart). Sparsity gets a panel only when it varies across
    layers (a uniform target would only repeat itself); without errors, that panel is all there is.
    """
    plt = _pyplot()
    panels = []
    errors = _by_type(layers, "reconstruction_error")
    if errors:
        panels.append((errors, "relative output error"))
    sparsity = [float(r["sparsity"]) for r in layers]
    if sparsity and (max(sparsity) - min(sparsity) > UNIFORM_TOLERANCE or not panels):
        panels.append((_by_type(layers, "sparsity"), "sparsity"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.6 * len(panels)), squeeze=False, sharex=True,
                             constrained_layout=True)
    for ax, (series, label) in zip(axes[:, 0], panels, strict=True):
        _plot_series(ax, series, label)
    axes[-1, 0].set_xlabel("decoder block (depth)")
    axes[0, 0].set_title(title)
    return fig


def ranking_figure(rows: Sequence[Mapping[str, Any]], x: str, y: str, label: str, title: str):
    """Scatter of candidates (e.g. parameters vs loss), the chosen one highlighted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.scatter([r[x] for r in rows], [r[y] for r in rows], c="tab:blue")
    for r in rows:
        ax.annotate(str(r[label]), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    return fig


def lottery_figure(rows: Sequence[Mapping[str, Any]], title: str):
    """Test accuracy versus density (log scale, densest left) for IMP and its controls, per round.

    ``rows`` are summary.json rounds: ``density``, ``accuracy``, ``random_reinit_accuracy`` and
    ``random_mask_accuracy`` (None where a control was not run); round 0 is the dense network.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    series = (("accuracy", "IMP ticket", "tab:blue", "o"),
              ("random_reinit_accuracy", "random re-init (same mask)", "tab:orange", "s"),
              ("random_mask_accuracy", "random mask (same density)", "tab:green", "^"))
    for key, label, color, marker in series:
        points = [(float(r["density"]), float(r[key])) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=label)
    dense = [r for r in rows if r["round"] == 0 and r.get("accuracy") is not None]
    if dense:
        ax.axhline(float(dense[0]["accuracy"]), color="gray", ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = sorted({round(float(r["density"]), 3) for r in rows}, reverse=True)
    ax.set_xticks(ticks, [f"{100 * t:.3g}%" for t in ticks], rotation=45, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("density (fraction of weights kept)")
    ax.set_ylabel("test accuracy")
    ax.legend(loc="lower left")
    ax.set_title(title)
    return fig


def candidate_figure(rows: Sequence[Mapping[str, Any]], chosen: str, dense_loss: float | None, title: str):
    """Minitron candidates: parameters (millions) vs calibration LM loss, the chosen one starred.

    ``rows`` have ``id``, ``parameters`` and ``loss``; ``dense_loss`` (the dense model on the same
    windows) is drawn as a dashed line when given.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.scatter([r["parameters"] / 1e6 for r in rows], [r["loss"] for r in rows], c="tab:blue", label="candidates")
    for r in rows:
        ax.annotate(str(r["id"]), (r["parameters"] / 1e6, r["loss"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    best = [r for r in rows if r["id"] == chosen]
    if best:
        ax.scatter([best[0]["parameters"] / 1e6], [best[0]["loss"]], marker="*", s=250, c="tab:red", zorder=3,
                   label=f"chosen: {chosen}")
    if dense_loss is not None:
        ax.axhline(dense_loss, color="gray", ls="--", lw=1, label="dense model")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("calibration LM loss (nats/token)")
    ax.legend(loc="best", fontsize=7)
    ax.set_title(title)
    return fig
