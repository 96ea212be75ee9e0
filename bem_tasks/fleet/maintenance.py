"""The work of the daily `bem_fleet_maintenance` DAG: health check, retention, metadata cleanup and
the weekly report. The DAG file only wires these up (bem_tasks.fleet.dags)."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from bem_tasks.config.loader import FleetConfig
from bem_tasks.fleet.alerts import send_alert
from bem_tasks.fleet.health import health_check
from bem_tasks.fleet.retention import run_cleanup
from bem_tasks.fleet.trends import weekly_report

log = logging.getLogger("bem_fleet.maintenance")


def check_health(cfg: FleetConfig) -> dict[str, Any]:
    """Run every check; a failed one is alerted and fails the task (after all have run)."""
    checks = health_check(cfg)
    for c in checks:
        log.info("health %-12s %-5s %s", c.name, "ok" if c.ok else "FAIL", c.detail)
    failed = [c for c in checks if not c.ok]
    if failed:
        message = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        send_alert(
            cfg.arch.operations.alerts,
            "health",
            f"health check failed: {message}",
            checks={c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        )
        raise RuntimeError(f"health check failed: {message}")
    return {c.name: c.detail for c in checks}


def apply_retention(cfg: FleetConfig) -> dict[str, Any]:
    plan = run_cleanup(cfg, dry_run=False, say=log.info)
    return {
        "deleted": len(plan.delete),
        "pruned": len(plan.prune),
        "protected": len(plan.keep),
        "bytes_freed": plan.bytes_freed,
    }


def clean_metadata_db(cfg: FleetConfig, now: datetime | None = None) -> str:
    """`airflow db clean` of the metadata older than `maintenance.db_clean_days`."""
    days = cfg.arch.operations.maintenance.db_clean_days
    before = (now or datetime.now(UTC)) - timedelta(days=days)
    cmd = [
        str(Path(sys.executable).parent / "airflow"),
        "db",
        "clean",
        "--clean-before-timestamp",
        before.isoformat(timespec="seconds"),
        "--skip-archive",
        "--yes",
    ]
    log.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"airflow db clean failed ({done.returncode}): {done.stderr[-2000:]}")
    return before.isoformat(timespec="seconds")


def rotate_task_logs(log_folder: Path, days: float, now: datetime | None = None) -> int:
    """Delete task log files older than ``days`` (Airflow keeps them forever); returns bytes."""
    cutoff = (now or datetime.now(UTC)).timestamp() - days * 86_400
    freed = 0
    for f in [p for p in log_folder.rglob("*") if p.is_file()]:
        st = f.stat()
        if st.st_mtime < cutoff:
            f.unlink()
            freed += st.st_size
    for d in sorted((p for p in log_folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    log.info("task logs: %d bytes older than %g days removed from %s", freed, days, log_folder)
    return freed


def write_weekly_report(
    cfg: FleetConfig, when: datetime, *, force: Literal["auto", "always", "never"] = "auto"
) -> str | None:
    """On the configured weekday (or when forced): the weekly report of gated metrics."""
    due = when.weekday() == cfg.arch.operations.maintenance.weekly_report_weekday
    if force == "never" or (force == "auto" and not due):
        log.info("weekly report: not today (%s, %s)", when.strftime("%A"), force)
        return None
    root = cfg.artifact_root
    out = weekly_report(root, root / "reports", now=when)
    log.info("weekly report: %s", out)
    return str(out)
