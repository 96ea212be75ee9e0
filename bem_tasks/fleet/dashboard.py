"""The fleet dashboard's content, built from the artifacts (served by the Airflow plugin).

The page reloads itself every 30 s, so it must not re-read every artifact on every refresh, and
one bad file must not take it down: JSON artifacts are parsed once per version of the file
(``ArtifactCache``), and a file that cannot be shown becomes an error on its run's row.
"""

from __future__ import annotations

import html
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bem_tasks.fleet.runs import component_name
from bem_tasks.fleet.summary import (
    PHASE_HEADERS,
    ArtifactError,
    fmt_num,
    phase_rows,
    read_json_file,
)


class ArtifactCache:
    """Parsed JSON files keyed by path, reused while the file's (mtime_ns, size, inode) is
    unchanged; an atomic replace makes a new inode, so a rewrite within one mtime tick is seen
    too. A file that failed to parse is cached as its error, so a corrupt file is not re-read
    on every refresh either. Least recently used entries beyond ``max_entries`` are dropped.
    Callers must not modify what they get (it is shared between requests)."""

    def __init__(
        self, reader: Callable[[Path], Any] = read_json_file, max_entries: int = 4096
    ) -> None:
        self.reader = reader
        self.max_entries = max_entries
        self._entries: OrderedDict[Path, tuple[tuple[int, int, int], Any, str | None]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()  # FastAPI runs sync routes in a thread pool

    def read_json(self, path: Path) -> Any:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ArtifactError(f"{path}: unreadable ({exc})") from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            hit = self._entries.get(path)
            if hit is not None and hit[0] == key:
                self._entries.move_to_end(path)
                value, error = hit[1], hit[2]
                if error is not None:
                    raise ArtifactError(error)
                return value
        value, error = None, None
        try:
            value = self.reader(path)
        except ArtifactError as exc:
            error = str(exc)
        with self._lock:
            self._entries[path] = (key, value, error)
            self._entries.move_to_end(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        if error is not None:
            raise ArtifactError(error)
        return value


ARTIFACTS = ArtifactCache()  # one per api-server process


def _report(path: Path, cache: ArtifactCache) -> dict[str, Any]:
    """A promotion report in the shape the page reads, or ``{"error": ...}`` naming the file."""
    try:
        doc = cache.read_json(path)
    except ArtifactError as exc:
        return {"error": str(exc)}
    if not isinstance(doc, dict) or not isinstance(doc.get("decisions", []), list):
        return {"error": f"{path}:decisions: expected an object with a list of decisions"}
    for i, d in enumerate(doc.get("decisions", [])):
        if not isinstance(d, dict) or not isinstance(d.get("gates", []), list):
            return {"error": f"{path}:decisions[{i}]: expected an object with a list of gates"}
        if not all(isinstance(g, dict) for g in d.get("gates", [])):
            return {"error": f"{path}:decisions[{i}].gates: expected a list of objects"}
    return doc


def _run_entry(run_dir: Path, cache: ArtifactCache) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "dag_id": component_name(run_dir.parent.name),
        "run_id": component_name(run_dir.name),
        "phases": [],
        "promotion_reports": [],
        "errors": [],
    }
    try:
        entry["phases"] = [
            dict(zip(PHASE_HEADERS, r, strict=True)) for r in phase_rows(run_dir, cache.read_json)
        ]
        entry["promotion_reports"] = [
            _report(path, cache) for path in sorted(run_dir.glob("**/promotion_report.json"))
        ]
    except (OSError, ValueError, TypeError, KeyError) as exc:  # e.g. deleted while listed
        entry["errors"].append(f"{run_dir}: could not be read ({type(exc).__name__}: {exc})")
    entry["errors"] += [p["headline"] for p in entry["phases"] if p["status"] == "ERROR"]
    entry["errors"] += [r["error"] for r in entry["promotion_reports"] if "error" in r]
    return entry


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0  # deleted since it was listed (retention): sorts last, shown as an error


def fleet_overview(
    artifact_root: Path, *, limit: int = 10, cache: ArtifactCache | None = None
) -> dict[str, Any]:
    """Most recent runs of every DAG under the artifact root, newest first. A run whose
    artifacts cannot be read is listed with ``errors`` (each naming its file)."""
    cache = cache or ARTIFACTS
    runs = []
    if artifact_root.exists():
        dags = [d for d in artifact_root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        run_dirs = [d for dag in dags for d in dag.iterdir() if d.is_dir()]
        for run_dir in sorted(run_dirs, key=_mtime, reverse=True)[:limit]:
            runs.append(_run_entry(run_dir, cache))
    return {"artifact_root": str(artifact_root), "runs": runs}


GATE_HEADERS = ["gate", "metric", "slice", "observed", "CI", "threshold", "p (BH)", "n", "status",
                "n needed", "why"]  # fmt: skip


def gate_rows(decision: dict[str, Any]) -> list[list[str]]:
    """One row per gate of a promotion decision (the report's JSON), formatted for reading."""
    rows = []
    for g in decision.get("gates", []):
        rel = bool(g.get("relative"))
        ci = (
            f"[{fmt_num(g['ci_low'], relative=rel)}, {fmt_num(g.get('ci_high'), relative=rel)}]"
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
        in_rows = {p["headline"] for p in run["phases"] if p["status"] == "ERROR"}
        for error in run.get("errors", []):
            if error not in in_rows:  # a phase's error is shown on its row below
                parts.append(f"<p class='ERROR'>{esc(error)}</p>")
        if run["phases"]:
            parts.append(
                _table(PHASE_HEADERS, [[r[h] for h in PHASE_HEADERS] for r in run["phases"]])
            )
        for report in run["promotion_reports"]:
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


def mission_page(
    artifact_root: Path, mission: str, *, cache: ArtifactCache | None = None
) -> dict[str, Any]:
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
    points, problems = collect_trends(artifact_root, read_json=(cache or ARTIFACTS).read_json)
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
