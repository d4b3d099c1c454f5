"""Markdown tables for ``bench_oneshot.py`` results (``--tables``)."""

from __future__ import annotations

from typing import Any

STAGES = ("prepare", "evaluate_dense", "calibrate", "prune", "calibrate_and_prune", "assemble",
          "evaluate_pruned", "log", "total")
PATTERN_ORDER = ("50", "2:4", "70")
PATTERN_NAME = {"50": "50% unstructured", "2:4": "2:4", "70": "70% unstructured"}


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _load(row: dict[str, Any]) -> str:
    return f"{row['loadavg_before'][0]:.1f}/{row['loadavg_after'][0]:.1f}"


def quality_table(rows: dict[str, dict[str, Any]]) -> str:
    jobs = [r for r in rows.values() if r["kind"] == "job"]
    head = ("| pattern | method | scope | calibration | perplexity | sparsity | "
            + " | ".join(s.replace("_", " ") for s in STAGES)
            + " | process wall s | CPU s | peak RSS MiB | tree RSS MiB | load 1-min before/after | finished |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in PATTERN_ORDER:
        for r in jobs:
            if r["pattern_key"] != key:
                continue
            s = r["seconds"]
            method = r["method"] if r["natural"] else f"{r['method']} (other mode)"
            lines.append(
                f"| {PATTERN_NAME[key]} | {method} | {r['scope'] or '–'} | {r['calibration_mode'].replace('_', '-')} | "
                f"**{r['perplexity_after']:.2f}** | {r['sparsity']:.4f} | "
                + " | ".join(_f(s.get(st)) for st in STAGES)
                + f" | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                  f"{r['peak_tree_rss_mib']:.0f} | {_load(r)} | {r['finished'][5:16]} |")
    return "\n".join(lines) + "\n"


def _ppl(rows: dict[str, dict[str, Any]], rid: str) -> float | None:
    r = rows.get(rid)
    return None if r is None else r["perplexity_after"]


def sgpt_vs_wanda(rows: dict[str, dict[str, Any]]) -> str:
    """SparseGPT against Wanda per pattern: natural settings, and with the same calibration mode."""
    lines = ["| pattern | comparison | SparseGPT | Wanda | SparseGPT / Wanda | SparseGPT better? |",
             "|---|---|---:|---:|---:|---|"]
    for key in PATTERN_ORDER:
        tag = key.replace(":", "of")
        pairs = [("natural (SparseGPT sequential, Wanda one-pass)", "sequential", "one_pass"),
                 ("both sequential", "sequential", "sequential"),
                 ("both one-pass", "one_pass", "one_pass")]
        for label, sm, wm in pairs:
            s, w = _ppl(rows, f"job-sparsegpt-{tag}-{sm}"), _ppl(rows, f"job-wanda-{tag}-{wm}")
            if s is None or w is None:
                continue
            lines.append(f"| {PATTERN_NAME[key]} | {label} | {s:.2f} | {w:.2f} | {s / w:.3f} | "
                         f"{'yes' if s < w else '**no**'} |")
    return "\n".join(lines) + "\n"


def reference_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | pattern | our job (calibration) | ours | reference | reference function | "
             "ref windows | ours vs ref | within 1%? | mask agreement | sparsity ours / ref | "
             "our calibrate+prune s | ref prune s | our peak RSS MiB | ref peak RSS MiB |",
             "|---|---|---|---:|---:|---|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in (r for r in rows.values() if r["kind"] == "ref"):
        ours = rows.get(r["compared_with"])
        if ours is None:
            continue
        diff = ours["perplexity_after"] / r["perplexity_after"] - 1  # > 0: ours is worse
        s = ours["seconds"]
        ours_s = s.get("calibrate_and_prune", (s.get("calibrate") or 0) + (s.get("prune") or 0))
        agree = r.get("mask_agreement")
        lines.append(
            f"| {r['method']} | {PATTERN_NAME[r['pattern_key']]} | {ours['calibration_mode'].replace('_', '-')} | "
            f"{ours['perplexity_after']:.3f} | {r['perplexity_after']:.3f} | `{r['function']}` | "
            f"{'reversed' if r.get('reverse') else 'in order'} | {diff:+.2%} | "
            f"{'yes' if abs(diff) <= 0.01 else '**no**'} | {_f(agree, '{:.5f}')} | "
            f"{ours['sparsity']:.6f} / {r['sparsity']:.6f} | {ours_s:.1f} | {r['seconds']['prune']:.1f} | "
            f"{ours['peak_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def spread_table(rows: dict[str, dict[str, Any]]) -> str:
    """Our job against the reference run twice: windows in order and reversed.

    The statistics are sums over the same tokens, so the two reference runs differ only by float
    rounding; their spread is the reference's own numerical noise on this protocol."""
    lines = ["| method | pattern | ours | ref, in order | ref, reversed | ref spread | ref masks agree | "
             "ours vs nearest ref | ours within [min, max] ± 1%? |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in rows.values() if r["kind"] == "ref" and r.get("reverse")):
        fwd, ours = rows.get(r["id"].removesuffix("-reversed")), rows.get(r["compared_with"])
        if fwd is None or ours is None:
            continue
        a, b, o = fwd["perplexity_after"], r["perplexity_after"], ours["perplexity_after"]
        lo, hi = min(a, b), max(a, b)
        nearest = min((a, b), key=lambda x: abs(o / x - 1))
        inside = lo * 0.99 <= o <= hi * 1.01
        lines.append(f"| {r['method']} | {PATTERN_NAME[r['pattern_key']]} | {o:.3f} | {a:.3f} | {b:.3f} | "
                     f"{hi / lo - 1:.2%} | {_f(r.get('mask_agreement_ref_in_order'), '{:.5f}')} | "
                     f"{o / nearest - 1:+.2%} | {'yes' if inside else '**no**'} |")
    return "\n".join(lines) + "\n"


def render_tables(results: dict[str, Any]) -> str:
    rows = results.get("rows", {})
    dense = sorted({round(r["perplexity_before"], 4) for r in rows.values() if r.get("perplexity_before")})
    out = [f"Dense perplexity (every job measures it): {', '.join(f'{d:.4f}' for d in dense) or '–'}\n",
           "### Quality and cost per job\n", quality_table(rows),
           "\n### SparseGPT vs Wanda\n", sgpt_vs_wanda(rows),
           "\n### Authors' reference code vs our job\n", reference_table(rows),
           "\n### The reference's own spread (calibration windows in order and reversed)\n", spread_table(rows)]
    return "\n".join(out)


__all__ = ["render_tables"]
