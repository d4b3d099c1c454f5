"""Figures and tables for MLflow and Prefect: what people would rather look at than read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


def layer_figure(layers: Sequence[Mapping[str, Any]], title: str):
    """Per-layer sparsity (bars) and relative output reconstruction error (line) in model order."""
    plt = _pyplot()
    names = [str(r["name"]) for r in layers]
    sparsity = [float(r["sparsity"]) for r in layers]
    error = [r.get("reconstruction_error") for r in layers]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.06 * len(names)), 4.5), constrained_layout=True)
    xs = range(len(names))
    ax.bar(xs, sparsity, color="tab:blue", alpha=0.6, label="sparsity")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (model order)")
    if any(e is not None for e in error):
        ax2 = ax.twinx()
        ax2.plot(xs, [float("nan") if e is None else float(e) for e in error], color="tab:red", lw=1.2,
                 marker=".", label="relative reconstruction error")
        ax2.set_ylabel("relative output error ||WX - W'X|| / ||WX||")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper right")
    step = max(1, len(names) // 30)
    ax.set_xticks(list(xs)[::step], [n.removeprefix("model.") for n in names][::step], rotation=90, fontsize=6)
    ax.legend(loc="upper left")
    ax.set_title(title)
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
