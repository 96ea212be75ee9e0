"""`bem-fleet status`: recent runs from the Airflow metadata DB, metrics from the artifacts."""

from __future__ import annotations

import os

from bem_tasks.config.loader import load_fleet
from bem_tasks.fleet.runs import FLEET_DAG_ID, RunLayout
from bem_tasks.fleet.summary import PHASE_HEADERS, format_table, phase_rows


def status(
    *, dag_id: str = FLEET_DAG_ID, mission: str | None, detailed: bool, config: str | None
) -> int:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    cfg = load_fleet(config)
    with create_session() as session:
        runs = session.scalars(
            select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.run_after.desc()).limit(5)
        ).all()
        if not runs:
            home = os.environ.get("AIRFLOW_HOME", "~/airflow")
            print(f"No runs of {dag_id} in the metadata DB of AIRFLOW_HOME={home} yet.")
            return 0
        rows = []
        for run in runs:
            tis = session.scalars(
                select(TaskInstance).where(
                    TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id
                )
            ).all()
            counts: dict[str, int] = {}
            for ti in tis:
                if mission and not ti.task_id.startswith(f"{mission}."):
                    continue
                counts[str(ti.state)] = counts.get(str(ti.state), 0) + 1
            states = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            rows.append([run.run_id, run.state, (run.conf or {}).get("profile", "-"), states])
        print(format_table(["run_id", "state", "profile", "tasks"], rows))
        latest = runs[0]
    if mission or detailed:
        run_dir = RunLayout(cfg.artifact_root, dag_id, latest.run_id).run_dir
        rows = [r for r in phase_rows(run_dir) if mission is None or r[0] == mission]
        print(f"\nLatest run {latest.run_id}: artifacts in {run_dir}")
        print(format_table(PHASE_HEADERS, rows) if rows else "(no phase artifacts yet)")
    return 0
