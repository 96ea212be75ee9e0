"""Retention (`bem-fleet cleanup`): what is deleted, what is protected, and pruning that never
leaves a manifest naming a missing file."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from bem_tasks.cli import main
from bem_tasks.config.schema import Retention
from bem_tasks.core.checkpoint import CheckpointManager
from bem_tasks.fleet.retention import apply_retention, plan_retention, promoted_paths, scan
from bem_tasks.fleet.runs import STATS_DAG_ID, RunLayout, verify_manifest, write_manifest
from bem_tasks.io import atomic_write_json

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
MISSIONS = ["mission_a", "mission_b"]


def _phase(root: Path, run_id: str, mission: str, phase: str, *, days_ago: float) -> Path:
    d = RunLayout(root, "bem_fleet", run_id).phase_dir(mission, phase, 0)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text('{"loss": 1.0}')
    write_manifest(d, config_hash="h", seed=0)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["created_at"] = (NOW - timedelta(days=days_ago)).isoformat()
    atomic_write_json(d / "manifest.json", manifest)
    return d


def _plan(root: Path, policy: Retention, **kw):
    return plan_retention(
        scan(root, MISSIONS),
        policy,
        promoted=kw.get("promoted", set()),
        running=kw.get("running", set()),
        now=NOW.timestamp(),
    )


def test_keeps_the_newest_runs_per_mission_and_deletes_the_rest(tmp_path: Path) -> None:
    for i, days in enumerate([3, 2, 1]):
        _phase(tmp_path, f"run{i}", "mission_a", "prepare", days_ago=days)
    _phase(tmp_path, "run0", "mission_b", "prepare", days_ago=3)  # the only mission_b run
    plan = _plan(tmp_path, Retention(keep_last_runs=2, max_age_days=None))
    assert [a.path for a in plan.delete] == [tmp_path / "bem_fleet/run0/mission_a"]
    assert "beyond the newest 2 of mission_a" in plan.delete[0].reason
    freed = plan.delete[0].bytes
    assert freed == sum(p.stat().st_size for p in plan.delete[0].path.rglob("*") if p.is_file())
    apply_retention(plan)
    assert not (tmp_path / "bem_fleet/run0/mission_a").exists()
    assert (tmp_path / "bem_fleet/run0/mission_b/prepare/seed_0/manifest.json").exists()
    assert (tmp_path / "bem_fleet/run2/mission_a").is_dir()
    assert not list(tmp_path.rglob(".trash-*"))


def test_age_limit_applies_within_the_newest_runs(tmp_path: Path) -> None:
    _phase(tmp_path, "old", "mission_a", "prepare", days_ago=40)
    _phase(tmp_path, "new", "mission_a", "prepare", days_ago=1)
    plan = _plan(tmp_path, Retention(keep_last_runs=5, max_age_days=30))
    assert [a.path.parent.name for a in plan.delete] == ["old"]
    assert "40.0 days old (limit 30)" in plan.delete[0].reason
    apply_retention(plan)
    assert not (tmp_path / "bem_fleet/old").exists(), "an emptied run folder goes too"


def test_promoted_running_and_in_progress_runs_are_never_deleted(tmp_path: Path) -> None:
    policy = Retention(keep_last_runs=1, max_age_days=1)
    promoted = _phase(tmp_path, "promoted", "mission_a", "prepare", days_ago=90).parents[1]
    _phase(tmp_path, "manual__2026-11-01T02:00:00+00:00", "mission_a", "prepare", days_ago=80)
    in_progress = RunLayout(tmp_path, "bem_fleet", "busy").phase_dir("mission_a", "train", 0)
    (in_progress / "ckpt").mkdir(parents=True)  # a phase writing checkpoints, no manifest yet
    stale = RunLayout(tmp_path, "bem_fleet", "crashed").phase_dir("mission_a", "train", 0)
    (stale / "ckpt").mkdir(parents=True)
    stale_mtime = (NOW - timedelta(days=3)).timestamp()
    for p in [*stale.parents[:3], stale, stale / "ckpt"]:
        os.utime(p, (stale_mtime, stale_mtime))
    atomic_write_json(
        tmp_path / "registry.json",
        {
            "version": 1,
            "missions": {
                "mission_a": {"current": None, "history": [{"model_path": str(promoted)}]}
            },
        },
    )
    plan = plan_retention(
        scan(tmp_path, MISSIONS),
        policy,
        promoted=promoted_paths(tmp_path / "registry.json"),
        running={("bem_fleet", "manual__2026-11-01T02:00:00+00:00")},
        now=NOW.timestamp() + 0,
    )
    kept = {a.path.parent.name: a.reason for a in plan.keep}
    assert kept["promoted"] == "promoted (in the registry)"
    assert kept["manual__2026-11-01T02~3a00~3a00~2b00~3a00"] == "running (metadata DB)"
    assert kept["busy"].startswith("unfinished, touched within 24 h")
    assert [a.path.parent.name for a in plan.delete] == ["crashed"]


def test_an_unreadable_manifest_keeps_its_run_and_says_why(tmp_path: Path) -> None:
    d = _phase(tmp_path, "bad", "mission_a", "prepare", days_ago=90)
    (d / "manifest.json").write_text("{not json")
    plan = _plan(tmp_path, Retention(keep_last_runs=1, max_age_days=1))
    assert not plan.delete
    assert plan.keep[0].reason.startswith("not judged: ") and "manifest.json" in plan.keep[0].reason


def test_report_runs_follow_the_same_rule_per_dag(tmp_path: Path) -> None:
    for name in ("a", "b"):
        out = RunLayout(tmp_path, STATS_DAG_ID, name).run_dir
        out.mkdir(parents=True)
        atomic_write_json(out / "statistical_results.json", {"missions": {}})
    plan = _plan(tmp_path, Retention(keep_last_runs=1, max_age_days=None))
    assert len(plan.delete) == 1 and plan.delete[0].path.parent.name == STATS_DAG_ID


def test_pruning_keeps_the_final_checkpoint_and_rewrites_the_manifest(tmp_path: Path) -> None:
    phase = RunLayout(tmp_path, "bem_fleet", "r").phase_dir("mission_a", "train", 0)
    model = torch.nn.Linear(4, 4)
    manager = CheckpointManager(phase / "ckpt" / "loop", keep=3, trainable_only=False)
    for step in (10, 20, 30):
        manager.save(step, model)
    write_manifest(phase, config_hash="h", seed=0)
    plan = _plan(tmp_path, Retention(keep_last_runs=5, max_age_days=None))
    (prune,) = plan.prune
    assert prune.folders == ("ckpt/loop/step-00000010", "ckpt/loop/step-00000020")
    apply_retention(plan)
    assert [s for s, _ in manager.checkpoints()] == [30]
    assert verify_manifest(phase) == [], "the manifest names only files that exist"
    manifest = json.loads((phase / "manifest.json").read_text())
    assert manifest["pruned"][0]["bytes"] == prune.bytes > 0
    assert any(k.startswith("ckpt/loop/step-00000030/") for k in manifest["files"])
    assert manager.resume(torch.nn.Linear(4, 4)).step == 30
    assert not _plan(tmp_path, Retention(max_age_days=None)).prune, "pruning is idempotent"


def test_cleanup_dry_run_prints_the_plan_and_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # no embedded Airflow home here
    old = _phase(tmp_path, "old", "mission_a", "prepare", days_ago=400)
    config = Path(__file__).resolve().parents[2] / "configs" / "bem_fleet_architecture.yml"
    assert main(["cleanup", "--dry-run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "delete" in out and str(old.parents[1]) in out and "would free" in out
    assert old.exists()
    assert main(["cleanup", "--config", str(config)]) == 0
    assert not old.exists() and "freed" in capsys.readouterr().out
