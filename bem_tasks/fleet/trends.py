"""Trends across gates runs: each gated metric's estimate and CI per run, as a PNG per mission
and in the weekly report, so that a regression shows the morning it lands."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bem_tasks.fleet.runs import GATES_DAG_ID
from bem_tasks.fleet.summary import read_json_file
from bem_tasks.io import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class TrendPoint:
    mission: str
    gate: str
    when: datetime  # when the gates run wrote its report
    gates_run: str
    decision: str
    status: str
    observed: float | None
    ci_low: float | None
    ci_high: float | None
    threshold: float
    relative: bool


def collect_trends(
    root: Path, since: datetime | None = None, read_json: Callable[[Path], Any] = read_json_file
) -> tuple[list[TrendPoint], list[str]]:
    """Every gate outcome of every gates run under the artifact root (oldest first), and the
    reports that could not be read (named, with the reason: they are skipped, not fatal).
    ``read_json`` parses a report (the dashboard passes its cache's)."""
    points: list[TrendPoint] = []
    problems: list[str] = []
    for path in (root / GATES_DAG_ID).glob("*/promotion_report.json"):
        when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        if since is not None and when < since:
            continue
        try:
            doc = read_json(path)
            for d in doc["decisions"]:
                for g in d["gates"]:
                    points.append(
                        TrendPoint(
                            mission=d["mission"],
                            gate=g["gate"],
                            when=when,
                            gates_run=path.parent.name,
                            decision=d["decision"],
                            status=g["status"],
                            observed=g.get("observed"),
                            ci_low=g.get("ci_low"),
                            ci_high=g.get("ci_high"),
                            threshold=float(g["threshold"]),
                            relative=bool(g.get("relative", False)),
                        )
                    )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path}: unreadable report ({type(exc).__name__}: {exc})")
    return sorted(points, key=lambda p: (p.when, p.mission, p.gate)), problems


def _figure(points: list[TrendPoint], mission: str) -> Any:
    """A panel per gate: each run's estimate with its CI, failed/undecided runs marked, the
    threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in points if p.mission == mission]
    gates = sorted({p.gate for p in mine})
    fig, axes = plt.subplots(len(gates), 1, figsize=(7, 2.2 * len(gates)), squeeze=False)
    for ax, gate in zip(axes[:, 0], gates, strict=True):
        series = [p for p in mine if p.gate == gate and p.observed is not None]
        xs = [p.when for p in series]
        ys = [float(p.observed or 0.0) for p in series]
        lo = [
            y - p.ci_low if p.ci_low is not None else 0.0 for y, p in zip(ys, series, strict=True)
        ]
        hi = [
            p.ci_high - y if p.ci_high is not None else 0.0 for y, p in zip(ys, series, strict=True)
        ]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3)
        for x, y, p in zip(xs, ys, series, strict=True):
            if p.status != "passed":
                ax.plot([x], [y], "rx", markersize=9)
        if series:
            ax.axhline(series[-1].threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{gate} (x: gate failed or undecided; dashed: threshold)", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def trend_png(points: list[TrendPoint], mission: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = _figure(points, mission)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_trends(points: list[TrendPoint], out_dir: Path) -> list[Path]:
    """One PNG per mission (trend_<mission>.png)."""
    written = []
    for mission in sorted({p.mission for p in points}):
        out = out_dir / f"trend_{mission}.png"
        atomic_write_bytes(out, trend_png(points, mission))
        written.append(out)
    return written


def _fmt(v: float | None, relative: bool) -> str:
    if v is None:
        return "-"
    return f"{v:+.1%}" if relative else f"{v:.4g}"


def weekly_report(root: Path, out_dir: Path, now: datetime | None = None) -> Path:
    """Markdown of the last 7 days' gates runs: per mission and gate, each run's estimate and CI,
    and the change since the previous run; trend PNGs beside it (all runs, for context)."""
    now = now or datetime.now(UTC)
    points, problems = collect_trends(root)
    week = [p for p in points if p.when >= now - timedelta(days=7)]
    pngs = plot_trends(points, out_dir) if points else []
    lines = [
        f"# BEM fleet weekly report ({(now - timedelta(days=7)):%Y-%m-%d} .. {now:%Y-%m-%d})",
        "",
    ]
    if not week:
        lines.append("No gates run in the last 7 days.")
    for mission in sorted({p.mission for p in week}):
        mine = [p for p in week if p.mission == mission]
        runs = sorted({(p.when, p.gates_run, p.decision) for p in mine})
        lines += [f"## {mission}", "", "Decisions: " + ", ".join(
            f"{w:%m-%d %H:%M} {d}" for w, _, d in runs), ""]  # fmt: skip
        lines += [
            "| gate | run | estimate | CI | status | change vs previous |",
            "|---|---|---|---|---|---|",
        ]
        for gate in sorted({p.gate for p in mine}):
            previous: TrendPoint | None = None
            for p in [q for q in points if q.mission == mission and q.gate == gate]:
                if p in mine:
                    change = (
                        _fmt(p.observed - previous.observed, p.relative)
                        if previous and previous.observed is not None and p.observed is not None
                        else "-"
                    )
                    ci = f"[{_fmt(p.ci_low, p.relative)}, {_fmt(p.ci_high, p.relative)}]"
                    lines.append(
                        f"| {gate} | {p.when:%m-%d %H:%M} | {_fmt(p.observed, p.relative)} | "
                        f"{ci} | {p.status} | {change} |"
                    )
                previous = p
        png = out_dir / f"trend_{mission}.png"
        if png in pngs:
            lines += ["", f"![{mission} trend]({png.name})"]
        lines.append("")
    if problems:
        lines += ["## Unreadable reports", "", *[f"- {p}" for p in problems]]
    out = out_dir / f"weekly_{now:%Y-%m-%d}.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
