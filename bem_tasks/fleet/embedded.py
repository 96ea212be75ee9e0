"""The embedded default engine: `airflow standalone` under a project-local AIRFLOW_HOME.

`make run` calls ``run_fleet``: initialise AIRFLOW_HOME (SQLite, LocalExecutor, no examples),
sync the pools, start Airflow in the background, trigger `bem_fleet` through the REST API
(exactly what a CI job does), follow every task and the asset-triggered runs downstream,
then print a summary. `make stop` calls ``stop``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bem_tasks.fleet.runs import FLEET_DAG_ID, GATES_DAG_ID, STATS_DAG_ID

# Each asset-triggered DAG after the fleet run, with the task whose success emits its asset.
DOWNSTREAM = ((STATS_DAG_ID, "publish_results"), (GATES_DAG_ID, "validate"))
FINISHED = {"success", "failed"}
TI_DONE = {"success", "failed", "skipped", "upstream_failed", "removed"}


@dataclass(frozen=True)
class Embedded:
    project: Path
    port: int = 8080

    @property
    def home(self) -> Path:
        """Always the project's `.airflow/`, whatever AIRFLOW_HOME the shell exports.

        A shell's AIRFLOW_HOME usually belongs to another Airflow (``~/airflow``): `make run`
        would migrate its database and leave a standalone there that `make stop` and
        `make clean` (which know only `.airflow/`) do not find. There is no override.
        """
        return self.project / ".airflow"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "standalone.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "standalone.log"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                # Airflow's default for this home, pinned so that a shell's own metadata DB
                # setting cannot send `make run` to migrate and use that database.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.project / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.project / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
                "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "10",
                "BEM_FLEET_CONFIG": str(self.project / "configs" / "bem_fleet_architecture.yml"),
                "BEM_FLEET_ARTIFACT_ROOT": os.environ.get(
                    "BEM_FLEET_ARTIFACT_ROOT", str(self.project / "artifacts")
                ),
                # standalone spawns `airflow` sub-processes: they must be found on PATH.
                "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
                "WANDB_MODE": env.get("WANDB_MODE", "offline"),
            }
        )
        return env

    # ------------------------------------------------------------------ lifecycle

    def airflow(self, *args: str) -> None:
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args], env=self.env(), check=True
        )

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def start(self, say: Callable[[str], None]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.running_pid():
            say(f"Airflow already running (pid {self.running_pid()}), {self.url}")
            return
        say(f"Initialising AIRFLOW_HOME={self.home} (SQLite, LocalExecutor)")
        self.airflow("db", "migrate")
        subprocess.run(
            [str(Path(sys.executable).parent / "bem-fleet"), "pools", "sync"],
            env=self.env(),
            check=True,
        )
        say(f"Starting `airflow standalone` in the background; log: {self.log_file}")
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), "standalone"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))

    def stop(self, say: Callable[[str], None]) -> bool:
        pid = self.running_pid()
        if pid is None:
            say("Airflow is not running.")
            return False
        os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            if self.running_pid() is None:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        say(f"Stopped Airflow (pid {pid}).")
        return True

    # ------------------------------------------------------------------ REST API

    def client(self, timeout_s: float = 300) -> httpx.Client:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).raise_for_status()
                if self.password_file.exists():
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Airflow API at {self.url} did not come up in {timeout_s:.0f}s; "
                    f"see {self.log_file}"
                )
            if self.running_pid() is None:
                raise RuntimeError(f"airflow standalone exited; see {self.log_file}")
            time.sleep(2)
        user, password = next(iter(json.loads(self.password_file.read_text()).items()))
        token = httpx.post(
            f"{self.url}/auth/token", json={"username": user, "password": password}, timeout=30
        )
        token.raise_for_status()
        return httpx.Client(
            base_url=f"{self.url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )


def _wait_for_dag(api: httpx.Client, dag_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while api.get(f"/dags/{dag_id}").status_code != 200:
        if time.monotonic() > deadline:
            errors = api.get("/importErrors").json().get("import_errors", [])
            detail = "\n".join(e.get("stack_trace", "") for e in errors)
            raise RuntimeError(f"DAG {dag_id} not parsed after {timeout_s:.0f}s.\n{detail}")
        time.sleep(2)


def trigger_fleet(api: httpx.Client, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Trigger ``dag_id`` (still paused), taking the place of its pending scheduled run.

    With catchup=False, unpausing a cron DAG starts its most recent past tick at once (default
    params, every seed), which would run before ours under max_active_runs=1. Taking that tick's
    logical date makes the scheduler see the run as existing and move on to the next tick.
    """
    dag = api.get(f"/dags/{dag_id}").json()
    logical_date = None
    due = dag.get("next_dagrun_run_after")
    if dag.get("is_paused") and due and datetime.fromisoformat(due) <= datetime.now(UTC):
        logical_date = dag["next_dagrun_logical_date"]
    trigger = api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": logical_date, "conf": conf})
    trigger.raise_for_status()
    run: dict[str, Any] = trigger.json()
    return run


def follow_run(
    api: httpx.Client, dag_id: str, run_id: str, say: Callable[[str], None], poll_s: float = 3
) -> tuple[str, list[dict[str, Any]]]:
    """Print a line each time a task changes state; return the run's state and its tasks."""
    seen: dict[str, str] = {}
    while True:
        run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
        tis = api.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 500}
        ).json()["task_instances"]
        for ti in sorted(tis, key=lambda t: (t.get("start_date") or "", t["task_id"])):
            key = f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]
            state = ti.get("state") or "none"
            if seen.get(key) != state:
                seen[key] = state
                dur = f" {ti['duration']:.1f}s" if ti.get("duration") else ""
                say(f"  [{dag_id}] {key:<45} {state}{dur}")
        if run["state"] in FINISHED:
            return run["state"], tis
        time.sleep(poll_s)


def follow_downstream(
    api: httpx.Client,
    dag_id: str,
    after: str,
    say: Callable[[str], None],
    expect: bool,
    timeout_s: float = 180,
    poll_s: float = 3,
) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Follow every run of ``dag_id`` with run_after >= ``after`` until none is left to come.

    Asset events start these runs, and not one per fleet run: each mission's event can start
    its own run, and with max_active_runs=1 the scheduler holds queued events back until the
    active run ends, so a run can appear while another is being followed. More are to come
    while the DAG has queued asset events (read before the run list, so a run created in
    between is listed). ``expect`` (the upstream emitted an event) waits up to ``timeout_s``
    for a first run; a run that never comes is reported as state "missing".
    """
    followed: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        queued = api.get(f"/dags/{dag_id}/assets/queuedEvents").json()["queued_events"]
        listed = api.get(
            f"/dags/{dag_id}/dagRuns",
            params={"run_after_gte": after, "order_by": "run_after", "limit": 100},
        ).json()["dag_runs"]
        new = [r["dag_run_id"] for r in listed if r["dag_run_id"] not in followed]
        for run_id in new:
            followed[run_id] = follow_run(api, dag_id, run_id, say, poll_s)
        if new:
            deadline = time.monotonic() + timeout_s
            continue
        if not queued and (followed or not expect):
            break
        if time.monotonic() > deadline:
            say(f"  [{dag_id}] no asset-triggered run appeared within {timeout_s:.0f} s")
            followed["-"] = ("missing", [])
            break
        time.sleep(poll_s)
    return [(dag_id, run_id, state, tis) for run_id, (state, tis) in followed.items()]


def run_fleet(
    project: Path, conf: dict[str, Any], say: Callable[[str], None] = print, port: int = 8080
) -> int:
    """Start (if needed), trigger `bem_fleet`, follow everything it sets off; 0 when all succeeded."""
    from bem_tasks.fleet.summary import print_summary

    emb = Embedded(project, port)
    emb.start(say)
    api = emb.client()
    _wait_for_dag(api, FLEET_DAG_ID)
    run = trigger_fleet(api, FLEET_DAG_ID, conf)
    deployed = [d for d, _ in DOWNSTREAM if api.get(f"/dags/{d}").status_code == 200]
    for dag_id in (FLEET_DAG_ID, *deployed):
        api.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    say(f"Triggered {FLEET_DAG_ID} run {run['dag_run_id']} with conf {json.dumps(conf)}")
    state, tis = follow_run(api, FLEET_DAG_ID, run["dag_run_id"], say)
    runs = [(FLEET_DAG_ID, run["dag_run_id"], state, tis)]

    # Asset events from the missions schedule the statistics DAG, and its asset the gates DAG.
    for dag_id, emitter in DOWNSTREAM:
        if dag_id not in deployed:
            say(f"  [{dag_id}] not deployed; skipping")
            continue
        expect = any(
            t["task_id"].rpartition(".")[2] == emitter and t.get("state") == "success"
            for r in runs
            for t in r[3]
        )
        runs += follow_downstream(api, dag_id, run["run_after"], say, expect)

    env = emb.env()
    artifact_root = Path(env["BEM_FLEET_ARTIFACT_ROOT"])
    print_summary(runs, artifact_root, say)
    # Missions that failed still have their publish task; only an empty fleet has none.
    if not any(t["task_id"].endswith("publish_results") for t in tis):
        say("No mission ran: the fleet has no enabled mission, so nothing was trained.")
    say(f"\nArtifacts: {artifact_root}")
    say(f"Airflow UI: {emb.url}  (user: admin, password in {emb.password_file})")
    say("Stop Airflow with: make stop")
    ok = all(r[2] == "success" for r in runs) and not any(
        t.get("state") in ("failed", "upstream_failed") for r in runs for t in r[3]
    )
    return 0 if ok else 1
