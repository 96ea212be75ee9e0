"""Trends across nightly gates runs and the weekly report, from real promotion_report.json files."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bem_tasks.fleet.maintenance import write_weekly_report
from bem_tasks.fleet.runs import GATES_DAG_ID
from bem_tasks.fleet.trends import collect_trends, weekly_report
from bem_tasks.io import atomic_write_json

NOW = datetime(2026, 11, 30, 6, tzinfo=UTC)  # a Monday


def _gate(observed: float, status: str) -> dict:
    return {
        "gate": "em_gain", "kind": "superiority", "metric": "em", "slice": "slice_b",
        "family": "performance", "op": ">=", "threshold": 1.5, "relative": False,
        "statistic": "mean", "status": status, "reason": "", "observed": observed,
        "ci_low": observed - 1.0, "ci_high": observed + 1.0,
    }  # fmt: skip


def _report(root: Path, name: str, days_ago: float, observed: float, status: str) -> Path:
    path = root / GATES_DAG_ID / name / "promotion_report.json"
    decision = "PROMOTED" if status == "passed" else "REJECTED"
    atomic_write_json(
        path,
        {"decisions": [{"mission": "mission_a", "decision": decision,
                        "gates": [_gate(observed, status)]}]},
    )  # fmt: skip
    stamp = (NOW - timedelta(days=days_ago)).timestamp()
    os.utime(path, (stamp, stamp))
    return path


def test_trends_list_each_run_oldest_first_and_skip_unreadable_reports(tmp_path: Path) -> None:
    _report(tmp_path, "n2", 1, 2.5, "passed")
    _report(tmp_path, "n1", 2, 3.0, "passed")
    bad = tmp_path / GATES_DAG_ID / "broken" / "promotion_report.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    points, problems = collect_trends(tmp_path)
    assert [(p.gates_run, p.observed) for p in points] == [("n1", 3.0), ("n2", 2.5)]
    assert len(problems) == 1 and str(bad) in problems[0]


def test_weekly_report_shows_estimates_cis_and_the_regression(tmp_path: Path) -> None:
    _report(tmp_path, "old", 20, 4.0, "passed")  # before the week: context for the first change
    _report(tmp_path, "n1", 3, 3.0, "passed")
    _report(tmp_path, "n2", 1, 0.5, "failed")  # the regression lands
    out = weekly_report(tmp_path, tmp_path / "reports", now=NOW)
    text = out.read_text()
    assert "## mission_a" in text
    assert "| em_gain | 11-27 06:00 | 3 | [2, 4] | passed | -1 |" in text
    assert "| em_gain | 11-29 06:00 | 0.5 | [-0.5, 1.5] | failed | -2.5 |" in text
    assert "11-20" not in text.split("## mission_a")[1].split("![")[0], "only this week's rows"
    png = tmp_path / "reports" / "trend_mission_a.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "trend_mission_a.png" in text


def test_weekly_report_only_on_the_configured_weekday(tmp_path: Path, monkeypatch) -> None:
    from bem_tasks.config.loader import load_fleet

    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    cfg = load_fleet(Path(__file__).resolve().parents[2] / "configs/bem_fleet_architecture.yml")
    assert cfg.arch.operations.maintenance.weekly_report_weekday == 0
    assert write_weekly_report(cfg, NOW + timedelta(days=1)) is None
    assert write_weekly_report(cfg, NOW, force="never") is None
    assert write_weekly_report(cfg, NOW + timedelta(days=1), force="always")
    written = write_weekly_report(cfg, NOW)
    assert written and Path(written).read_text().startswith("# BEM fleet weekly report")
    assert "No gates run in the last 7 days." in Path(written).read_text()


def test_task_logs_older_than_the_limit_are_rotated(tmp_path: Path) -> None:
    from bem_tasks.fleet.maintenance import rotate_task_logs

    old = tmp_path / "dag_id=bem_fleet/run_id=a/task_id=x/attempt=1.log"
    new = tmp_path / "dag_id=bem_fleet/run_id=b/task_id=x/attempt=1.log"
    for f in (old, new):
        f.parent.mkdir(parents=True)
        f.write_text("log line\n")
    stamp = (NOW - timedelta(days=40)).timestamp()
    os.utime(old, (stamp, stamp))
    assert rotate_task_logs(tmp_path, 30, now=NOW) == len("log line\n")
    assert not old.exists() and not old.parent.exists() and new.exists()
