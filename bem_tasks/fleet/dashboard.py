"""The fleet dashboard's content, built from the artifacts (served by the Airflow plugin)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from bem_tasks.fleet.summary import PHASE_HEADERS, fmt_num, phase_rows


def fleet_overview(artifact_root: Path, *, limit: int = 10) -> dict[str, Any]:
    """Most recent runs of every DAG under the artifact root, newest first."""
    runs = []
    if artifact_root.exists():
        run_dirs = [d for dag in artifact_root.iterdir() if dag.is_dir() for d in dag.iterdir()]
        run_dirs = [d for d in run_dirs if d.is_dir()]
        for run_dir in sorted(run_dirs, key=lambda d: d.stat().st_mtime, reverse=True)[:limit]:
            reports = []
            for path in sorted(run_dir.glob("**/promotion_report.json")):
                try:
                    reports.append(json.loads(path.read_text()))
                except json.JSONDecodeError:
                    reports.append({"error": f"{path}: not valid JSON"})
            runs.append(
                {
                    "dag_id": run_dir.parent.name,
                    "run_id": run_dir.name,
                    "phases": [
                        dict(zip(PHASE_HEADERS, r, strict=True)) for r in phase_rows(run_dir)
                    ],
                    "promotion_reports": reports,
                }
            )
    return {"artifact_root": str(artifact_root), "runs": runs}


GATE_HEADERS = ["gate", "metric", "slice", "observed", "CI", "threshold", "p (BH)", "n", "status",
                "n needed", "why"]  # fmt: skip


def gate_rows(decision: dict[str, Any]) -> list[list[str]]:
    """One row per gate of a promotion decision (the report's JSON), formatted for reading."""
    rows = []
    for g in decision.get("gates", []):
        rel = bool(g.get("relative"))
        ci = (
            f"[{fmt_num(g['ci_low'], relative=rel)}, {fmt_num(g['ci_high'], relative=rel)}]"
            if g.get("ci_low") is not None
            else ""
        )
        stat = "" if g.get("statistic") in (None, "mean", "value") else f" ({g['statistic']})"
        rows.append([
            g.get("gate", ""), f"{g.get('metric', '')}{stat}", g.get("slice", ""),
            fmt_num(g.get("observed"), relative=rel), ci, f"{g.get('op', '')} {fmt_num(g.get('threshold'), relative=rel)}",
            fmt_num(g.get("p_adjusted")), str(g.get("n") or ""), g.get("status", ""),
            str(g.get("n_needed") or ""), g.get("reason", ""),
        ])  # fmt: skip
    return rows


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(overview: dict[str, Any], *, refresh_s: int = 30) -> str:
    """The page; it reloads itself every ``refresh_s`` seconds (0: never)."""
    esc = html.escape
    refresh = f"<meta http-equiv='refresh' content='{int(refresh_s)}'>" if refresh_s > 0 else ""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>BEM Fleet</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        ".PROMOTED{color:#1a7f37}.REJECTED{color:#cf222e}.INSUFFICIENT_EVIDENCE{color:#9a6700}"
        ".ERROR{color:#cf222e;font-weight:bold}"
        "</style></head><body>",
        "<h1>BEM Fleet</h1>",
        f"<p>Artifacts: <code>{esc(overview['artifact_root'])}</code>. "
        + (f"Refreshes every {int(refresh_s)} s; " if refresh_s > 0 else "")
        + "JSON: <a href='api/overview'>api/overview</a>.</p>",
    ]
    if not overview["runs"]:
        parts.append("<p>No runs yet. Trigger <code>bem_fleet</code> from the DAG list.</p>")
    for run in overview["runs"]:
        parts.append(f"<h2>{esc(run['dag_id'])} / {esc(run['run_id'])}</h2>")
        if run["phases"]:
            parts.append(
                _table(PHASE_HEADERS, [[r[h] for h in PHASE_HEADERS] for r in run["phases"]])
            )
        for report in run["promotion_reports"]:
            if "error" in report:
                parts.append(f"<p class='REJECTED'>{esc(report['error'])}</p>")
            for d in report.get("decisions", []):
                decision = str(d.get("decision", "?"))
                parts.append(
                    f"<h3>{esc(str(d.get('mission', '?')))}: "
                    f"<span class='{esc(decision)}'>{esc(decision)}</span></h3>"
                    f"<p>{esc(str(d.get('summary', '')))}</p>"
                )
                if d.get("error"):
                    parts.append(f"<p class='ERROR'>{esc(str(d['error']))}</p>")
                parts.append(_table(GATE_HEADERS, gate_rows(d)))
    parts.append("</body></html>")
    return "".join(parts)
