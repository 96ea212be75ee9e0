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
                name = esc(str(d.get("mission", "?")))
                parts.append(
                    f"<h3><a href='mission/{name}'>{name}</a>: "
                    f"<span class='{esc(decision)}'>{esc(decision)}</span></h3>"
                    f"<p>{esc(str(d.get('summary', '')))}</p>"
                )
                if d.get("error"):
                    parts.append(f"<p class='ERROR'>{esc(str(d['error']))}</p>")
                parts.append(_table(GATE_HEADERS, gate_rows(d)))
    parts.append("</body></html>")
    return "".join(parts)


# ----------------------------------------------------------------------------- mission pages


def _newest_mission_dir(artifact_root: Path, mission: str) -> Path | None:
    """The newest run folder holding this mission's phases (any mission or fleet DAG)."""
    found = [d for d in artifact_root.glob(f"*/*/{mission}") if d.is_dir()]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def mission_page(artifact_root: Path, mission: str) -> dict[str, Any]:
    """What a mission's page shows: its newest run's curves (the PNGs its phases wrote), the
    newest forest plot, and each gated metric across the gates runs (estimate and CI per run)."""
    from bem_tasks.fleet.runs import GATES_DAG_ID
    from bem_tasks.fleet.trends import collect_trends

    run = _newest_mission_dir(artifact_root, mission)
    curves = (
        sorted(
            str(p.relative_to(artifact_root))
            for p in run.rglob("*.png")
            if "ckpt" not in p.parts and not any(part.startswith(".") for part in p.parts)
        )
        if run
        else []
    )
    forests = sorted(
        artifact_root.glob(f"{GATES_DAG_ID}/*/forest_{mission}.png"),
        key=lambda p: p.stat().st_mtime,
    )
    points, problems = collect_trends(artifact_root)
    trend = [
        {
            "gate": p.gate,
            "when": p.when.isoformat(timespec="minutes"),
            "gates_run": p.gates_run,
            "decision": p.decision,
            "status": p.status,
            "observed": p.observed,
            "ci_low": p.ci_low,
            "ci_high": p.ci_high,
            "relative": p.relative,
        }
        for p in points
        if p.mission == mission
    ]
    return {
        "mission": mission,
        "run": str(run.relative_to(artifact_root)) if run else None,
        "curves": curves,
        "forest": str(forests[-1].relative_to(artifact_root)) if forests else None,
        "trend": trend,
        "problems": problems,
    }


def render_mission_html(page: dict[str, Any]) -> str:
    esc = html.escape
    mission = esc(page["mission"])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>BEM Fleet: {mission}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:900px}"
        "</style></head><body>",
        f"<p><a href='../'>BEM Fleet</a></p><h1>{mission}</h1>",
        f"<h2>Trends</h2><img src='{mission}/trend.png' alt='{mission} trend'>"
        if page["trend"]
        else "<h2>Trends</h2><p>No gates run has judged this mission yet.</p>",
    ]
    if page["trend"]:
        rows = [
            [
                t["gate"], t["gates_run"], t["when"], t["decision"],
                fmt_num(t["observed"], relative=t["relative"]),
                f"[{fmt_num(t['ci_low'], relative=t['relative'])}, "
                f"{fmt_num(t['ci_high'], relative=t['relative'])}]",
                t["status"],
            ]
            for t in page["trend"]
        ]  # fmt: skip
        parts.append(
            _table(["gate", "gates run", "judged", "decision", "estimate", "CI", "status"], rows)
        )
    for problem in page["problems"]:
        parts.append(f"<p class='ERROR'>{esc(problem)}</p>")
    parts.append("<h2>Forest plot (newest gates run)</h2>")
    parts.append(
        f"<img src='../file/{esc(page['forest'])}' alt='forest plot'>"
        if page["forest"]
        else "<p>None yet.</p>"
    )
    parts.append(f"<h2>Curves of the newest run ({esc(str(page['run'] or 'none'))})</h2>")
    for curve in page["curves"]:
        parts.append(f"<h3>{esc(curve)}</h3><img src='../file/{esc(curve)}' alt='{esc(curve)}'>")
    if not page["curves"]:
        parts.append("<p>No curves yet.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def artifact_png(artifact_root: Path, relative: str) -> Path | None:
    """A PNG under the artifact root, or None (anything else, or a path that leaves it)."""
    root = artifact_root.resolve()
    path = (root / relative).resolve()
    if path.suffix != ".png" or not path.is_relative_to(root) or not path.is_file():
        return None
    return path
