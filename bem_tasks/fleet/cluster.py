"""The distributed engine on one machine: a CeleryExecutor cluster run as local subprocesses.

``CeleryCluster`` starts the Airflow 3 core (api-server, scheduler, dag-processor and, if asked,
the triggerer) and one ``airflow celery worker`` per ``WorkerSpec``. Every component gets the
same AIRFLOW_HOME, metadata DB, broker, secrets and BEM Fleet settings, so it behaves like the
docker-compose cluster (README.md, "Run on a cluster") without Docker. It needs running PostgreSQL and Redis
(it creates neither) and is what the integration tests drive.

    cluster = CeleryCluster(project, home, database_url=..., broker_url=...,
                            workers=[WorkerSpec("cpu", ("cpu",)), WorkerSpec("h100", ("h100_80gb",))])
    cluster.prepare()          # airflow db migrate, bem-fleet pools sync
    with cluster:              # start ... stop (process groups, even on error)
        cluster.wait_healthy()
        api = cluster.client() # bem_tasks.fleet.api.AirflowApi as the admin

Each worker exports ``BEM_FLEET_WORKER_QUEUES`` (its queues), which a phase records in its
manifest, so where a phase ran can be checked afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from bem_tasks.fleet.api import AirflowApi, AirflowApiError, health

AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
HEALTHY = "healthy"


class ClusterError(RuntimeError):
    """A component failed to start, died, or did not become healthy."""


@dataclass(frozen=True)
class WorkerSpec:
    """One Celery worker: node ``<name>@<host>`` consuming ``queues``."""

    name: str
    queues: tuple[str, ...]
    concurrency: int = 2


@dataclass(frozen=True)
class ClusterSecrets:
    """Shared by every component: tokens, connections and sessions break if they differ."""

    jwt_secret: str
    fernet_key: str
    api_secret_key: str
    admin_password: str

    @classmethod
    def generate(cls) -> ClusterSecrets:
        return cls(
            jwt_secret=secrets.token_urlsafe(32),
            fernet_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
            api_secret_key=secrets.token_urlsafe(32),
            admin_password=secrets.token_urlsafe(16),
        )


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


@dataclass
class CeleryCluster:
    project: Path
    home: Path
    database_url: str  # SQLAlchemy URL, e.g. postgresql+psycopg2://user@127.0.0.1:5432/airflow
    broker_url: str  # e.g. redis://127.0.0.1:6379/0
    workers: Sequence[WorkerSpec]
    port: int = 8080
    host: str = "127.0.0.1"
    config_path: Path | None = None
    artifact_root: Path | None = None
    lock_dir: Path | None = None
    deployment_profile: str = "full"
    # Tasks without a device class (plan, publishing) need a queue some worker serves; the
    # docker-compose cluster uses the cpu one too.
    default_queue: str = "cpu"
    triggerer: bool = False
    admin_user: str = "admin"
    secrets: ClusterSecrets = field(default_factory=ClusterSecrets.generate, repr=False)
    extra_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    components: list[Component] = field(default_factory=list, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.home / "cluster_logs"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json"

    @property
    def bin(self) -> Path:
        return Path(sys.executable).parent

    # ------------------------------------------------------------------ environment

    def env(self) -> dict[str, str]:
        """The environment every component shares."""
        config = self.config_path or self.project / "configs" / "bem_fleet_architecture.yml"
        env = dict(os.environ)
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.database_url}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__API__HOST": self.host,
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets.jwt_secret,
                "AIRFLOW__API__SECRET_KEY": self.secrets.api_secret_key,
                "AIRFLOW__CORE__FERNET_KEY": self.secrets.fernet_key,
                "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.admin_user}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.project / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.project / "plugins"),
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.default_queue,
                "BEM_FLEET_CONFIG": str(config),
                "BEM_FLEET_DEPLOYMENT_PROFILE": self.deployment_profile,
                # Components spawn `airflow` sub-processes: the venv's bin must come first.
                "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            }
        )
        if self.artifact_root is not None:
            env["BEM_FLEET_ARTIFACT_ROOT"] = str(self.artifact_root)
        if self.lock_dir is not None:
            env["BEM_FLEET_LOCK_DIR"] = str(self.lock_dir)
        env.update(self.extra_env)
        return env

    def _worker_env(self, spec: WorkerSpec, log_port: int) -> dict[str, str]:
        env = self.env()
        env["BEM_FLEET_WORKER_QUEUES"] = ",".join(spec.queues)
        # Each worker serves its task logs on its own port: two on one host would collide.
        env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(log_port)
        return env

    # ------------------------------------------------------------------ lifecycle

    def prepare(self) -> None:
        """Initialise AIRFLOW_HOME and the metadata DB, write the admin password, sync the pools."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(json.dumps({self.admin_user: self.secrets.admin_password}))
        self.password_file.chmod(0o600)
        self._run_setup("db_migrate", [str(self.bin / "airflow"), "db", "migrate"])
        self._run_setup("pools_sync", [str(self.bin / "bem-fleet"), "pools", "sync"])

    def _run_setup(self, name: str, argv: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            done = subprocess.run(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise ClusterError(
                f"`{' '.join(argv[-2:])}` exited {done.returncode}; log {log_path}:\n"
                + _tail(log_path, 40)
            )

    def start(self) -> None:
        airflow = str(self.bin / "airflow")
        core = ["api-server", "scheduler", "dag-processor"]
        if self.triggerer:
            core.append("triggerer")
        self.components = [
            Component(name, [airflow, name], self.env(), self.log_dir / f"{name}.log")
            for name in core
        ]
        for spec in self.workers:
            argv = [
                airflow,
                "celery",
                "worker",
                "--queues",
                ",".join(spec.queues),
                "--celery-hostname",
                f"{spec.name}@%h",
                "--concurrency",
                str(spec.concurrency),
            ]
            env = self._worker_env(spec, free_port())
            self.components.append(
                Component(
                    f"worker_{spec.name}", argv, env, self.log_dir / f"worker_{spec.name}.log"
                )
            )
        for comp in self.components:
            with open(comp.log_path, "ab") as log:
                comp.proc = subprocess.Popen(
                    comp.argv,
                    env=comp.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: stop() takes its children too
                )

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every process the components started, then SIGKILL what is left after ``grace_s``.

        "Every process" is each component's process group (a group id is never reused while a
        member lives, so these are ours even after a leader died) plus the descendants of live
        leaders, which covers a child that moved to a session of its own.
        """
        import psutil

        procs = _ours([c.proc.pid for c in self.components if c.proc is not None])
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            # psutil checks that the pid still names the process it saw before signalling it.
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for comp in self.components:
            if comp.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    comp.proc.wait(timeout=5)

    def __enter__(self) -> CeleryCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ health

    def check_alive(self) -> None:
        dead = [c for c in self.components if c.exit_code is not None]
        if dead:
            names = ", ".join(f"{c.name} (exit {c.exit_code})" for c in dead)
            raise ClusterError(f"component(s) exited: {names}\n{self.log_tails()}")

    def health(self) -> dict[str, str]:
        """Status of each core component from the api-server's health endpoint."""
        body = health(self.url)
        return {k: (v or {}).get("status") or "unknown" for k, v in body.items()}

    def wait_healthy(self, timeout_s: float = 240) -> None:
        wanted = ["metadatabase", "scheduler", "dag_processor"] + (
            ["triggerer"] if self.triggerer else []
        )
        deadline = time.monotonic() + timeout_s
        status: dict[str, str] = {}
        while True:
            self.check_alive()
            try:
                status = self.health()
                if all(status.get(k) == HEALTHY for k in wanted):
                    return
            except (httpx.HTTPError, AirflowApiError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"cluster not healthy after {timeout_s:.0f}s (health: {status or 'no answer'})"
                    f"\n{self.log_tails()}"
                )
            time.sleep(2)

    # ------------------------------------------------------------------ REST API

    def client(self) -> AirflowApi:
        """The REST API v2 as the admin (bem_tasks.fleet.api: token refreshed, statuses checked)."""
        return AirflowApi(self.url, self.admin_user, self.secrets.admin_password)

    # ------------------------------------------------------------------ logs

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"----- {path.name} (last {lines} lines) -----\n{_tail(path, lines)}")
        return "\n".join(parts)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ours(leaders: Sequence[int]) -> list[Any]:
    """Live processes in the leaders' process groups, and descendants of the live leaders."""
    import psutil

    groups = set(leaders)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in groups:
                found[proc.pid] = proc
    for pid in leaders:
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(pid)
            if leader.status() != psutil.STATUS_ZOMBIE:
                for child in leader.children(recursive=True):
                    found.setdefault(child.pid, child)
    return list(found.values())


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            return _last_lines(f, lines)
    except FileNotFoundError:
        return "(no log)"


def _last_lines(f: IO[bytes], lines: int, block: int = 65536) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - block))
    text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
