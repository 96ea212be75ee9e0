"""The fleet's health check: what the maintenance DAG runs daily and `bem-fleet health` prints.

Four checks, each with a reason: free disk space on the artifact root, Airflow's pools equal to
the device classes in config, a live worker for every device class's queue (Celery: a worker
consuming that queue answers an inspect ping; LocalExecutor: the scheduler, which runs the tasks
itself, has a recent heartbeat), and a reachable metadata DB.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bem_tasks.config.loader import FleetConfig


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def disk_check(root: Path, min_free_gb: float) -> Check:
    probe = root
    while not probe.exists():  # the root of a fresh deployment may not exist yet
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 2**30
    ok = free_gb >= min_free_gb
    return Check("disk", ok, f"{free_gb:.1f} GiB free on {probe} (minimum {min_free_gb:g})")


def pools_check(cfg: FleetConfig) -> Check:
    from bem_tasks.fleet.pools import sync_pools

    drift = sync_pools(cfg, dry_run=True)
    if drift:
        return Check("pools", False, "; ".join(drift) + " (run `bem-fleet pools sync`)")
    return Check("pools", True, f"{len(cfg.arch.device_classes)} pools match the config")


def database_check() -> Check:
    from airflow.utils.session import create_session
    from sqlalchemy import text

    try:
        with create_session() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - the answer is the check's result
        return Check("metadata_db", False, f"unreachable: {type(exc).__name__}: {exc}")
    return Check("metadata_db", True, "reachable")


def workers_check(cfg: FleetConfig, timeout_s: float = 5.0) -> Check:
    from airflow.configuration import conf

    executor = conf.get("core", "executor")
    if "CeleryExecutor" in executor:
        from airflow.providers.celery.executors.celery_executor import app

        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
        served = {q["name"] for queues in replies.values() for q in queues}
        missing = [c for c in cfg.arch.device_classes if c not in served]
        if missing:
            return Check(
                "workers",
                False,
                f"no live Celery worker consumes {missing} ({len(replies)} worker(s) answered)",
            )
        return Check("workers", True, f"{len(replies)} Celery worker(s) serve every queue")
    from airflow.jobs.job import most_recent_job
    from airflow.utils.session import create_session

    with create_session() as session:
        job = most_recent_job("SchedulerJob", session=session)
        alive = job is not None and job.is_alive()
    if not alive:
        return Check("workers", False, f"{executor}: no scheduler with a recent heartbeat")
    return Check("workers", True, f"{executor}: the scheduler runs every queue's tasks")


def health_check(cfg: FleetConfig) -> list[Check]:
    checks = [disk_check(cfg.artifact_root, cfg.arch.operations.maintenance.min_free_gb)]
    db = database_check()
    checks.append(db)
    if db.ok:  # pools and workers are read from the metadata DB
        checks += [pools_check(cfg), workers_check(cfg)]
    return checks
