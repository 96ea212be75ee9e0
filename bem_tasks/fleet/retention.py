"""Retention: which run folders a nightly fleet may delete, and which checkpoints it may prune.

The policy is ``operations.retention`` in the architecture file. Per mission, the newest
``keep_last_runs`` runs are kept and none older than ``max_age_days``; statistics and gates run
folders follow the same rule per DAG. Never deleted: a run the registry names as promoted (any
entry of its history), a run the metadata DB says is queued or running, and a run with an
unfinished phase (no manifest) touched within ``stale_after_hours`` (a run in progress when the
metadata DB cannot be asked). A complete phase keeps only the newest checkpoint of each training
loop (its final weights, still resumable); its manifest is rewritten first, so no manifest ever
names a file that is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bem_tasks.config.loader import FleetConfig
from bem_tasks.config.schema import Retention
from bem_tasks.fleet.runs import GATES_DAG_ID, MANIFEST, STATS_DAG_ID, safe_component
from bem_tasks.fleet.summary import format_table
from bem_tasks.io import atomic_write_json, remove_tree, utc_now

REPORT_DAGS = (STATS_DAG_ID, GATES_DAG_ID)
DAY_S = 86_400.0


@dataclass(frozen=True)
class RunUnit:
    """What retention keeps or deletes as a whole: one mission of one run, or one report run."""

    group: str  # the mission, or the statistics/gates DAG id
    dag: str  # folder names under the artifact root
    run: str
    path: Path
    created: float  # oldest manifest's creation (epoch s), else the folder's mtime
    touched: float  # newest mtime of anything inside
    unfinished: bool  # a phase folder without a manifest
    size: int
    problem: str = ""  # e.g. an unreadable manifest: such a unit is kept and reported


@dataclass(frozen=True)
class Action:
    path: Path
    reason: str
    bytes: int
    folders: tuple[str, ...] = ()  # pruning: checkpoint folders, relative to ``path`` (a phase)


@dataclass
class RetentionPlan:
    delete: list[Action] = field(default_factory=list)
    prune: list[Action] = field(default_factory=list)
    keep: list[Action] = field(default_factory=list)  # protected units, with why

    @property
    def bytes_freed(self) -> int:
        return sum(a.bytes for a in self.delete + self.prune)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _newest_mtime(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])


def _manifests(path: Path) -> list[Path]:
    """Phase manifests below ``path`` (checkpoints carry their own manifest.json: not phases)."""
    return [m for m in path.rglob(MANIFEST) if "ckpt" not in m.relative_to(path).parts]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _created(path: Path, manifests: list[Path]) -> float:
    stamps = []
    for m in manifests:
        created = _read_json(m).get("created_at")
        if isinstance(created, str):
            stamps.append(datetime.fromisoformat(created).timestamp())
    return min(stamps) if stamps else path.stat().st_mtime


def _finished(folder: Path) -> bool:
    """A phase folder with its manifest, or whose seed/variant folders all have theirs."""
    if (folder / MANIFEST).is_file():
        return True
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not subdirs or any(d.name == "ckpt" for d in subdirs):
        return False
    return all(_finished(d) for d in subdirs)


def _unfinished(mission_dir: Path) -> bool:
    phases = [d for d in mission_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return not all(_finished(d) for d in phases)


def scan(root: Path, missions: Iterable[str]) -> list[RunUnit]:
    """Every mission-run and report-run folder under the artifact root."""
    missions = set(missions)
    units: list[RunUnit] = []
    if not root.is_dir():
        return units
    for dag_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        report = dag_dir.name in REPORT_DAGS
        for run_dir in sorted(p for p in dag_dir.iterdir() if p.is_dir()):
            if run_dir.name.startswith("."):
                continue
            targets = (
                [(dag_dir.name, run_dir)]
                if report
                else [(m.name, m) for m in run_dir.iterdir() if m.is_dir() and m.name in missions]
            )
            for group, path in targets:
                problem = ""
                try:
                    created = _created(path, _manifests(path))
                except ValueError as exc:
                    created, problem = path.stat().st_mtime, str(exc)
                units.append(
                    RunUnit(
                        group=group,
                        dag=dag_dir.name,
                        run=run_dir.name,
                        path=path,
                        created=created,
                        touched=_newest_mtime(path),
                        unfinished=not report and _unfinished(path),
                        size=_size(path),
                        problem=problem,
                    )
                )
    return units


def promoted_paths(registry_path: Path) -> set[Path]:
    """Mission folders of every promoted entry (current and history) in the registry."""
    if not registry_path.is_file():
        return set()
    registry = _read_json(registry_path)
    missions = registry.get("missions")
    if not isinstance(missions, dict):
        raise ValueError(f"{registry_path}:missions: expected a mapping of mission -> entries")
    paths = set()
    for mission, slot in missions.items():
        entries = [slot.get("current")] + list(slot.get("history") or [])
        for entry in entries:
            if entry and entry.get("model_path"):
                paths.add(Path(entry["model_path"]).resolve())
            elif entry is not None:
                raise ValueError(f"{registry_path}:missions.{mission}: an entry has no model_path")
    return paths


def plan_retention(
    units: list[RunUnit],
    policy: Retention,
    *,
    promoted: set[Path],
    running: set[tuple[str, str]],
    now: float | None = None,
) -> RetentionPlan:
    """Decide, without touching anything. ``running`` holds (dag_id, run_id) pairs."""
    now = time.time() if now is None else now
    running_folders = {(safe_component(d), safe_component(r)) for d, r in running}
    plan = RetentionPlan()
    by_group: dict[str, list[RunUnit]] = defaultdict(list)
    for unit in units:
        by_group[unit.group].append(unit)
    for group_units in by_group.values():
        newest_first = sorted(group_units, key=lambda u: u.created, reverse=True)
        for rank, unit in enumerate(newest_first):
            protected = _protection(unit, policy, promoted, running_folders, now)
            if protected:
                plan.keep.append(Action(unit.path, protected, 0))
                continue
            age_days = (now - unit.created) / DAY_S
            if rank >= policy.keep_last_runs:
                reason = f"beyond the newest {policy.keep_last_runs} of {unit.group}"
            elif policy.max_age_days is not None and age_days > policy.max_age_days:
                reason = f"{age_days:.1f} days old (limit {policy.max_age_days:g})"
            else:
                plan.prune.extend(_prunable(unit.path))
                continue
            plan.delete.append(Action(unit.path, reason, unit.size))
    if not policy.prune_checkpoints:
        plan.prune = []
    return plan


def _protection(
    unit: RunUnit,
    policy: Retention,
    promoted: set[Path],
    running: set[tuple[str, str]],
    now: float,
) -> str:
    if unit.problem:
        return f"not judged: {unit.problem}"
    if unit.path.resolve() in promoted:
        return "promoted (in the registry)"
    if (unit.dag, unit.run) in running:
        return "running (metadata DB)"
    if unit.unfinished and now - unit.touched < policy.stale_after_hours * 3600:
        return f"unfinished, touched within {policy.stale_after_hours:g} h (may be running)"
    return ""


def _prunable(mission_or_phase: Path) -> list[Action]:
    """Older checkpoints of the complete phases under a folder (the newest of each loop stays)."""
    actions = []
    for manifest_path in _manifests(mission_or_phase):
        phase_dir = manifest_path.parent
        if _read_json(manifest_path).get("status") != "complete":
            continue
        old: list[Path] = []
        for loop in (phase_dir / "ckpt").glob("*"):
            steps = sorted(p for p in loop.glob("step-*") if p.is_dir())
            old += steps[:-1]
        if old:
            folders = tuple(str(d.relative_to(phase_dir)) for d in old)
            size = sum(_size(d) for d in old)
            actions.append(Action(phase_dir, f"{len(old)} older checkpoint(s)", size, folders))
    return actions


def apply_retention(plan: RetentionPlan) -> None:
    """Carry out a plan: a deleted folder first leaves its name atomically (rename into a
    hidden trash folder beside it), so no half-deleted run is ever visible."""
    for action in plan.prune:
        manifest_path = action.path / MANIFEST
        manifest = _read_json(manifest_path)
        gone = tuple(f"{folder}/" for folder in action.folders)
        manifest["files"] = {
            k: v for k, v in manifest.get("files", {}).items() if not k.startswith(gone)
        }
        manifest.setdefault("pruned", []).append(
            {"at": utc_now(), "reason": action.reason, "bytes": action.bytes}
        )
        atomic_write_json(manifest_path, manifest)  # before the files go
        for folder in action.folders:
            remove_tree(action.path / folder)
    for action in plan.delete:
        remove_tree(action.path)
        run_dir = action.path.parent
        if run_dir.is_dir() and not any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
            shutil.rmtree(run_dir, ignore_errors=True)


def running_runs() -> tuple[set[tuple[str, str]], str]:
    """(dag_id, run_id) of the queued and running DAG runs, and where that answer came from.

    Only asked when AIRFLOW_HOME names a metadata DB (importing Airflow without one would create
    ~/airflow); otherwise unfinished runs touched recently are what protects a run in progress.
    """
    if not os.environ.get("AIRFLOW_HOME"):
        return set(), "no metadata DB (AIRFLOW_HOME unset)"
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from airflow.utils.state import DagRunState
        from sqlalchemy import select

        with create_session() as session:
            rows = session.execute(
                select(DagRun.dag_id, DagRun.run_id).where(
                    DagRun.state.in_([DagRunState.RUNNING, DagRunState.QUEUED])
                )
            ).all()
    except Exception as exc:  # noqa: BLE001 - a cleanup without the DB still protects recent runs
        return set(), f"metadata DB unreachable ({type(exc).__name__}: {exc})"
    return {(str(d), str(r)) for d, r in rows}, f"metadata DB ({len(rows)} active run(s))"


def run_cleanup(cfg: FleetConfig, *, dry_run: bool, say: Callable[[str], None]) -> RetentionPlan:
    """Plan retention over the artifact root, print it, and apply it unless ``dry_run``."""
    policy = cfg.arch.operations.retention
    root = cfg.artifact_root
    running, source = running_runs()
    say(f"artifact root {root}; running runs from {source}")
    plan = plan_retention(
        scan(root, cfg.arch.missions),
        policy,
        promoted=promoted_paths(root / "registry.json"),
        running=running,
    )
    rows = [["delete", str(a.path), a.reason, _mib(a.bytes)] for a in plan.delete]
    rows += [["prune", str(a.path), a.reason, _mib(a.bytes)] for a in plan.prune]
    rows += [["keep", str(a.path), a.reason, "-"] for a in plan.keep]
    if rows:
        say(format_table(["action", "path", "why", "MiB"], rows))
    verb = "would free" if dry_run else "freed"
    if not dry_run:
        apply_retention(plan)
    say(
        f"{verb} {_mib(plan.bytes_freed)} MiB ({plan.bytes_freed} bytes): "
        f"{len(plan.delete)} run folder(s) deleted, {len(plan.prune)} phase(s) pruned, "
        f"{len(plan.keep)} protected"
    )
    return plan


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"
