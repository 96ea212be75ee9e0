"""The embedded default engine: `airflow standalone` under a project-local AIRFLOW_HOME.

`make run` calls ``run_fleet``: initialise AIRFLOW_HOME (SQLite, LocalExecutor, no examples),
sync the pools, start Airflow in the background, trigger `bem_fleet` through the REST API
(exactly what a CI job does), follow every task and the asset-triggered runs downstream,
then print a summary. `make stop` calls ``stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bem_tasks.fleet.api import AirflowApi, AirflowApiError, health
from bem_tasks.fleet.runs import FLEET_DAG_ID, GATES_DAG_ID, STATS_DAG_ID

# Each asset-triggered DAG after the fleet run, with the task whose success emits its asset.
DOWNSTREAM = ((STATS_DAG_ID, "publish_results"), (GATES_DAG_ID, "validate"))
FINISHED = {"success", "failed"}
TI_DONE = {"success", "failed", "skipped", "upstream_failed", "removed"}
# How long `make run` follows the runs it started (`bem-fleet run --timeout`).
DEFAULT_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class Embedded:
    project: Path
    port: int = 8080
    # None: the project's `.airflow/`. A caller that must not touch `make run`'s state (the load
    # test: bench/load_test.py) passes a folder of its own.
    airflow_home: Path | None = None
    # The scheduler's log server port; None: 8793 (8794 when the API is on 8793). A second
    # standalone beside `make run`'s needs another one, or its scheduler cannot bind it.
    log_server_port: int | None = None

    @property
    def home(self) -> Path:
        """The project's `.airflow/` (or ``airflow_home`` when given), whatever AIRFLOW_HOME the
        shell exports.

        A shell's AIRFLOW_HOME usually belongs to another Airflow (``~/airflow``): `make run`
        would migrate its database and leave a standalone there that `make stop` and
        `make clean` (which know only `.airflow/`) do not find. The shell's AIRFLOW_HOME is
        never used; only a caller's explicit ``airflow_home`` replaces `.airflow/`.
        """
        return self.airflow_home if self.airflow_home is not None else self.project / ".airflow"

    @property
    def host(self) -> str:
        """The address the API server binds: loopback, so the UI and its API are not offered
        to the network (Airflow's own default is 0.0.0.0). BEM_FLEET_HOST=0.0.0.0 opens it."""
        return os.environ.get("BEM_FLEET_HOST") or "127.0.0.1"

    @property
    def url(self) -> str:
        # A wildcard bind answers on loopback too; any other address only on itself.
        connect = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
        return f"http://{connect}:{self.port}"

    @property
    def log_port(self) -> int:
        """The scheduler's log server port: ``log_server_port``, else 8793, or 8794 when the API
        is on 8793 (the log server would take the port first and the API server would exit)."""
        if self.log_server_port is not None:
            return self.log_server_port
        return 8794 if self.port == 8793 else 8793

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
                "AIRFLOW__API__HOST": self.host,
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_port),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                # Task logs for this user only (Airflow's default is group-writable 0o664/0o775).
                "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
                "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
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
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        try:  # a standalone started by this process (the load test) lingers as a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return None
        except ChildProcessError:
            pass  # not our child (`make run` started it and exited): os.kill said enough
        return pid

    def start(self, say: Callable[[str], None]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.running_pid():
            say(f"Airflow already running (pid {self.running_pid()}), {self.url}")
            return
        say(f"Initialising AIRFLOW_HOME={self.home} (SQLite, LocalExecutor)")
        self.airflow("db", "migrate")
        sqlite_wal(self.home / "airflow.db")
        subprocess.run(
            [str(Path(sys.executable).parent / "bem-fleet"), "pools", "sync"],
            env=self.env(),
            check=True,
        )
        # The admin password and the log (which can carry tokens and connection strings) are
        # for this user only. Standalone opens the password file in append mode, so creating it
        # first with 0600 means the password is never on disk with wider permissions.
        _private(self.password_file)
        _private(self.log_file)
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

    def api(self, **kwargs: Any) -> AirflowApi:
        """A client of this Airflow's API as its admin (the password file standalone wrote)."""
        return AirflowApi.from_password_file(self.url, self.password_file, **kwargs)

    def client(self, timeout_s: float = 300) -> AirflowApi:
        """Once the API answers and the password file exists (both come a while after start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health(self.url)
                if self.password_file.exists() and self.password_file.stat().st_size:
                    break  # start() creates it empty; standalone writes the password into it
            except (httpx.HTTPError, AirflowApiError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Airflow API at {self.url} did not come up in {timeout_s:.0f}s; "
                    f"see {self.log_file}"
                )
            if self.running_pid() is None:
                raise RuntimeError(f"airflow standalone exited; see {self.log_file}")
            time.sleep(2)
        return self.api()


def sqlite_wal(db: Path) -> None:
    """Put the metadata database in SQLite's write-ahead-log mode.

    Airflow leaves SQLite in its rollback-journal mode, where a writer locks out every reader:
    the API server, scheduler, dag-processor and triggerer all share the file, and a burst of
    20 triggers through the REST API failed requests and once stopped the scheduler with
    "database is locked" (bench/load_test.py; D39). In WAL mode readers and the one writer do
    not block each other. The mode is stored in the file, so once set it holds for every
    later connection; setting it again is a no-op."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"{db}: SQLite refused the WAL journal mode (got {mode!r})")


def _private(path: Path) -> None:
    """Create ``path`` if missing (empty) and make it readable and writable by its owner only."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # an existing file keeps its mode in os.open


def wait_for_dag(api: AirflowApi, dag_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not api.exists(f"/dags/{dag_id}"):
        if time.monotonic() > deadline:
            errors = api.get("/importErrors").get("import_errors", [])
            detail = "\n".join(e.get("stack_trace", "") for e in errors)
            raise RuntimeError(f"DAG {dag_id} not parsed after {timeout_s:.0f}s.\n{detail}")
        time.sleep(2)


def trigger_fleet(api: AirflowApi, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Trigger ``dag_id`` (still paused), taking the place of its pending scheduled run.

    With catchup=False, unpausing a cron DAG starts its most recent past tick at once (default
    params, every seed), which would run before ours under max_active_runs=1. Taking that tick's
    logical date makes the scheduler see the run as existing and move on to the next tick.
    """
    logical_date = pending_tick(api, dag_id)
    return api.post(f"/dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf})


def pending_tick(api: AirflowApi, dag_id: str) -> str | None:
    """The logical date of ``dag_id``'s due scheduled run while it is paused, else None."""
    dag = api.get(f"/dags/{dag_id}")
    due = dag.get("next_dagrun_run_after")
    if dag.get("is_paused") and due and datetime.fromisoformat(due) <= datetime.now(UTC):
        tick: str | None = dag["next_dagrun_logical_date"]
        return tick
    return None


def ti_key(ti: dict[str, Any]) -> str:
    return f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]


def follow_run(
    api: AirflowApi,
    dag_id: str,
    run_id: str,
    say: Callable[[str], None],
    poll_s: float = 3,
    deadline: float | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Print a line each time a task changes state; return the run's state and its tasks.

    ``deadline`` (a ``time.monotonic()`` value): past it, TimeoutError names the run, its state
    and every unfinished task.
    """
    seen: dict[str, str] = {}
    while True:
        run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        tis = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", {"limit": 500})[
            "task_instances"
        ]
        for ti in sorted(tis, key=lambda t: (t.get("start_date") or "", t["task_id"])):
            key = ti_key(ti)
            state = ti.get("state") or "none"
            if seen.get(key) != state:
                seen[key] = state
                dur = f" {ti['duration']:.1f}s" if ti.get("duration") else ""
                say(f"  [{dag_id}] {key:<45} {state}{dur}")
        if run["state"] in FINISHED:
            return run["state"], tis
        if deadline is not None and time.monotonic() > deadline:
            waiting = {k: s for k, s in seen.items() if s not in TI_DONE}
            raise TimeoutError(
                f"{dag_id} run {run_id} still {run['state']} at the deadline; unfinished "
                f"tasks: {waiting or 'none'} (the run goes on in Airflow: its UI, or "
                "`bem-fleet status`, shows how it ends)"
            )
        time.sleep(poll_s)


def follow_downstream(
    api: AirflowApi,
    dag_id: str,
    after: str,
    say: Callable[[str], None],
    expect: bool,
    timeout_s: float = 180,
    poll_s: float = 3,
    deadline: float | None = None,
) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Follow every run of ``dag_id`` with run_after >= ``after`` until none is left to come.

    Asset events start these runs, and not one per fleet run: each mission's event can start
    its own run, and with max_active_runs=1 the scheduler holds queued events back until the
    active run ends, so a run can appear while another is being followed. More are to come
    while the DAG has queued asset events (read before the run list, so a run created in
    between is listed). ``expect`` (the upstream emitted an event) waits up to ``timeout_s``
    for a first run; a run that never comes is reported as state "missing". ``deadline`` is
    the overall one of ``follow_run``.
    """
    followed: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    wait_until = time.monotonic() + timeout_s
    while True:
        queued = api.get(f"/dags/{dag_id}/assets/queuedEvents")["queued_events"]
        listed = api.get(
            f"/dags/{dag_id}/dagRuns",
            {"run_after_gte": after, "order_by": "run_after", "limit": 100},
        )["dag_runs"]
        new = [r["dag_run_id"] for r in listed if r["dag_run_id"] not in followed]
        for run_id in new:
            followed[run_id] = follow_run(api, dag_id, run_id, say, poll_s, deadline)
        if new:
            wait_until = time.monotonic() + timeout_s
            continue
        if not queued and (followed or not expect):
            break
        if time.monotonic() > wait_until:
            say(f"  [{dag_id}] no asset-triggered run appeared within {timeout_s:.0f} s")
            followed["-"] = ("missing", [])
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{dag_id}: still waiting for asset-triggered runs at the deadline")
        time.sleep(poll_s)
    return [(dag_id, run_id, state, tis) for run_id, (state, tis) in followed.items()]


def run_fleet(
    project: Path,
    conf: dict[str, Any],
    say: Callable[[str], None] = print,
    port: int = 8080,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Start (if needed), trigger `bem_fleet`, follow everything it sets off; 0 when all succeeded.

    Following stops with TimeoutError ``timeout_s`` after the trigger (the runs go on).
    """
    emb = Embedded(project, port)
    emb.start(say)
    with emb.client() as api:
        return _run_and_follow(emb, api, conf, say, timeout_s)


def _run_and_follow(
    emb: Embedded,
    api: AirflowApi,
    conf: dict[str, Any],
    say: Callable[[str], None],
    timeout_s: float,
) -> int:
    from bem_tasks.fleet.summary import print_summary

    wait_for_dag(api, FLEET_DAG_ID)
    run = trigger_fleet(api, FLEET_DAG_ID, conf)
    deadline = time.monotonic() + timeout_s
    deployed = [d for d, _ in DOWNSTREAM if api.exists(f"/dags/{d}")]
    for dag_id in (FLEET_DAG_ID, *deployed):
        api.patch(f"/dags/{dag_id}", {"is_paused": False})
    say(f"Triggered {FLEET_DAG_ID} run {run['dag_run_id']} with conf {json.dumps(conf)}")
    state, tis = follow_run(api, FLEET_DAG_ID, run["dag_run_id"], say, deadline=deadline)
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
        runs += follow_downstream(api, dag_id, run["run_after"], say, expect, deadline=deadline)

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
