"""Forest plot of paired comparisons (PNG, matplotlib Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bem_tasks.io import atomic_write_bytes

_COLOURS = {"candidate": "#1a7f37", "baseline": "#cf222e", "neither": "#57606a"}


def _label(r: Mapping[str, Any]) -> str:
    stat = r.get("statistic", "mean")
    what = f"{stat} rel. change" if r.get("relative") else f"{stat} diff"
    return f"{r['mission']} / {r['metric']} [{r['slice']}]\n{what}, n={r['n']}"


def colour_key(r: Mapping[str, Any]) -> str:
    """Which side the BH-adjusted test of ``null_value`` favours: the colour of a forest row.

    ``"candidate"`` (green) when ``p_adjusted < alpha`` and the interval lies on the better side
    of the tested null (the gate threshold for a gated comparison, else no change), ``"baseline"``
    (red) when it lies on the worse side, ``"neither"`` (grey) when the adjusted test does not
    reject. The unadjusted interval alone never colours a row.
    """
    p_adj, alpha = r.get("p_adjusted"), r.get("alpha", 0.05)
    if p_adj is None or not float(p_adj) < float(alpha):
        return "neither"
    null = float(r.get("null_value", 0.0))
    if float(r["ci_low"]) > null:
        above = True
    elif float(r["ci_high"]) < null:
        above = False
    else:
        return "neither"
    return "candidate" if above == bool(r.get("higher_is_better", True)) else "baseline"


def plot_forest(
    results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Write a forest plot of ``analyze`` results to ``path`` (PNG) and return the path.

    One row per result, each with its own x axis because metrics have different units: the
    point estimate, its CI, no change (solid), the tested null value when it is not 0 (dashed)
    and, when a result carries a ``threshold`` key, the gate threshold (dotted). Relative changes
    are shown in %. Colour is the BH-adjusted decision the row's title reports (see
    :func:`colour_key`). Results with an ``error`` (no statistic) are left out.
    """
    results = [r for r in results if not r.get("error")]
    if not results:
        raise ValueError("plot_forest: no results to plot")
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 1, figsize=(8.0, 0.8 * rows + 1.0), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        scale = 100.0 if r.get("relative") else 1.0
        est, lo, hi = (float(r[k]) * scale for k in ("estimate", "ci_low", "ci_high"))
        colour = _COLOURS[colour_key(r)]
        ax.errorbar([est], [0], xerr=[[est - lo], [hi - est]], fmt="o", color=colour, capsize=4)
        null = float(r.get("null_value", 0.0)) * scale
        marks = [0.0, null]
        ax.axvline(0.0, color="#8c959f", lw=1)  # no change
        if null != 0.0:
            ax.axvline(null, color="#8c959f", ls="--", lw=1)
        if r.get("threshold") is not None:
            marks.append(float(r["threshold"]) * scale)
            ax.axvline(marks[-1], color="#bf8700", ls=":", lw=1.5)
        left, right = min(lo, *marks), max(hi, *marks)
        pad = 0.08 * (right - left) or 1.0
        ax.set_xlim(left - pad, right + pad)
        ax.set_yticks([0])
        ax.set_yticklabels([_label(r)], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if r.get("relative"):
            ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:+g}%")
        p_adj = r.get("p_adjusted")
        if p_adj is not None:
            h0 = f"{null:+g}%" if r.get("relative") else f"{null:g}"
            ax.set_title(f"BH p={float(p_adj):.3g} (H0: {h0})", fontsize=7, loc="right", pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
