"""The fleet dashboard's content, built from the artifacts (served by the Airflow plugin)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from bem_tasks.fleet.summary import phase_rows

PHASE_HEADERS = ["mission", "phase", "seed", "status", "duration", "headline"]


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


def render_html(overview: dict[str, Any]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>BEM Fleet</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
        "<h1>BEM Fleet</h1>",
        f"<p>Artifacts: <code>{esc(overview['artifact_root'])}</code></p>",
    ]
    if not overview["runs"]:
        parts.append("<p>No runs yet. Trigger <code>bem_fleet</code> from the DAG list.</p>")
    for run in overview["runs"]:
        parts.append(f"<h2>{esc(run['dag_id'])} / {esc(run['run_id'])}</h2>")
        if run["phases"]:
            parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in PHASE_HEADERS) + "</tr>")
            for row in run["phases"]:
                parts.append(
                    "<tr>"
                    + "".join(f"<td>{esc(str(row[h]))}</td>" for h in PHASE_HEADERS)
                    + "</tr>"
                )
            parts.append("</table>")
        for report in run["promotion_reports"]:
            parts.append(f"<pre>{esc(json.dumps(report, indent=2))[:20000]}</pre>")
    parts.append("</body></html>")
    return "".join(parts)
