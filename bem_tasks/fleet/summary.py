"""Tables for people: what ran, how long it took, what it measured, what was decided."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bem_tasks.fleet.runs import MANIFEST, RunLayout, safe_component

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


class ArtifactError(ValueError):
    """An artifact that cannot be shown: unreadable, not JSON, or a field of the wrong type."""


def read_json_file(path: Path) -> Any:
    """One JSON artifact, parsed; ArtifactError names the file (and line) when it cannot be."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _looks_numeric(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def check_metrics(metrics: Any, path: Path) -> dict[str, Any]:
    """``metrics.json`` as a mapping, or ArtifactError naming the key of the wrong type: the
    keys its ``headline`` list names must hold numbers (or null: not computed), and no value
    may be a number written as a string (``"42"``: the headline and the statistics would
    silently skip it)."""
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path}: expected a JSON object of metrics, got {_kind(metrics)}")
    keys = metrics.get("headline", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ArtifactError(f"{path}:headline: expected a list of metric names, got {keys!r}")
    for key, value in metrics.items():
        if isinstance(value, str) and _looks_numeric(value):
            raise ArtifactError(f"{path}:{key}: expected a number, got the string {value!r}")
        if key in keys and not (_is_number(value) or value is None):  # None: not computed
            raise ArtifactError(
                f"{path}:{key}: a headline metric must be a number, got {value!r} ({_kind(value)})"
            )
    return metrics


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool"}.get(
        type(v), type(v).__name__
    )


def _phase_row(phase_dir: Path, read_json: Callable[[Path], Any]) -> list[Any]:
    manifest_path = phase_dir / MANIFEST
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object, got {_kind(manifest)}")
    for key, ok, want in (
        ("mission", lambda v: isinstance(v, str), "a string"),
        ("phase", lambda v: isinstance(v, str), "a string"),
        ("variant", lambda v: v is None or isinstance(v, str), "a string"),
        ("status", lambda v: isinstance(v, str), "a string"),
        ("seed", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
         "an integer or null"),
        ("duration_s", _is_number, "a number of seconds"),
    ):  # fmt: skip
        if key in manifest and not ok(manifest[key]):
            raise ArtifactError(
                f"{manifest_path}:{key}: expected {want}, got {manifest[key]!r} "
                f"({_kind(manifest[key])})"
            )
    metrics_path = phase_dir / "metrics.json"
    metrics = check_metrics(read_json(metrics_path), metrics_path) if metrics_path.exists() else {}
    return [
        manifest.get("mission", "?"),
        manifest.get("phase", phase_dir.name)
        + (f"[{manifest['variant']}]" if manifest.get("variant") else ""),
        manifest["seed"] if manifest.get("seed") is not None else "-",
        manifest.get("status", "?"),
        f"{manifest.get('duration_s', 0):.1f}s",
        headline(metrics),
    ]


def _error_row(run_dir: Path, phase_dir: Path, message: str) -> list[Any]:
    """Where the folder says the phase is (mission/phase[/variant]/[seed_N]), and the error."""
    parts = phase_dir.relative_to(run_dir).parts
    number = parts[-1].removeprefix("seed_") if parts[-1].startswith("seed_") else ""
    seed: int | str = int(number) if number.isdigit() else "-"
    names = [p for p in parts[1:] if not p.startswith("seed_")]
    phase = names[0] + (f"[{names[1]}]" if len(names) > 1 else "")
    return [parts[0], phase, seed, "ERROR", "", message]


def phase_rows(run_dir: Path, read_json: Callable[[Path], Any] = read_json_file) -> list[list[Any]]:
    """One row per completed phase (and seed) under a run folder, read from its artifacts. A
    phase whose manifest or metrics cannot be shown gets a row with status ERROR and the reason
    (naming the file) in place of the headline; the other rows are unaffected."""
    rows = []
    for manifest_path in (
        sorted(run_dir.glob("*/*/manifest.json"))
        + sorted(run_dir.glob("*/*/seed_*/manifest.json"))
        + sorted(run_dir.glob("*/*/*/seed_*/manifest.json"))  # mapped phases: <variant>/seed_N
    ):
        phase_dir = manifest_path.parent
        try:
            rows.append(_phase_row(phase_dir, read_json))
        except ArtifactError as exc:
            rows.append(_error_row(run_dir, phase_dir, str(exc)))
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
