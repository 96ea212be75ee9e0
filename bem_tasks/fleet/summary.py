"""Tables for people: what ran, how long it took, what it measured, what was decided."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bem_tasks.fleet.runs import RunLayout, read_manifest, safe_component

HEADLINE_LIMIT = 6


PHASE_HEADERS = ["mission", "phase", "seed", "status", "duration", "headline"]  # phase_rows


def fmt_num(v: Any, *, relative: bool = False, missing: str = "") -> str:
    """A number for a table: 4 significant digits, or a signed percentage when relative."""
    if not isinstance(v, int | float):
        return missing
    return f"{v:+.1%}" if relative else f"{v:.4g}"


def format_table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def headline(metrics: dict[str, Any], limit: int = HEADLINE_LIMIT) -> str:
    """The phase's own `headline` keys when it names them, else its first numbers."""
    keys = metrics.get("headline")
    if isinstance(keys, list):
        metrics = {k: metrics[k] for k in keys if k in metrics}
        limit = len(metrics)
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts[:limit])


def phase_rows(run_dir: Path) -> list[list[Any]]:
    """One row per completed phase (and seed) under a run folder, read from its artifacts."""
    rows = []
    for manifest_path in (
        sorted(run_dir.glob("*/*/manifest.json"))
        + sorted(run_dir.glob("*/*/seed_*/manifest.json"))
        + sorted(run_dir.glob("*/*/*/seed_*/manifest.json"))  # mapped phases: <variant>/seed_N
    ):
        phase_dir = manifest_path.parent
        manifest = read_manifest(phase_dir) or {}
        metrics_path = phase_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        rows.append(
            [
                manifest.get("mission", "?"),
                manifest.get("phase", phase_dir.name)
                + (f"[{manifest['variant']}]" if manifest.get("variant") else ""),
                manifest.get("seed", "-") if manifest.get("seed") is not None else "-",
                manifest.get("status", "?"),
                f"{manifest.get('duration_s', 0):.1f}s",
                headline(metrics),
            ]
        )
    return rows


def task_rows(tis: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for ti in sorted(tis, key=lambda t: (t["task_id"], t["map_index"])):
        mission, _, phase = ti["task_id"].rpartition(".")
        seed = ti["map_index"] if ti["map_index"] >= 0 else "-"
        dur = f"{ti['duration']:.1f}s" if ti.get("duration") else "-"
        rows.append([mission or "-", phase, seed, ti.get("state") or "none", dur])
    return rows


def print_summary(
    runs: list[tuple[str, str, str, list[dict[str, Any]]]],
    artifact_root: Path,
    say: Callable[[str], None] = print,
) -> None:
    for dag_id, run_id, state, tis in runs:
        say(f"\n== {dag_id} run {run_id}: {state}")
        if tis:
            say(format_table(["mission", "task", "map", "state", "duration"], task_rows(tis)))
        run_dir = RunLayout(artifact_root, dag_id, run_id).run_dir
        rows = phase_rows(run_dir) if run_dir.exists() else []
        if rows:
            say("\nMetrics (from artifacts):")
            say(format_table(PHASE_HEADERS, rows))
        report = artifact_root / safe_component(dag_id) / safe_component(run_id)
        for md in sorted(report.glob("**/promotion_report.md")):
            say(f"\nPromotion report ({md}):\n{md.read_text()}")
