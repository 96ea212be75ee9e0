"""PostgreSQL, Redis and a CeleryExecutor cluster for the distributed-engine integration tests.

Services are expected on localhost (CI: PostgreSQL on 5432 with trust auth for user postgres,
Redis on 6379). With BEM_FLEET_REQUIRE_SERVICES=1 (set by .ci/run) an unreachable service fails
the tests; otherwise they are skipped with the reason. Each session gets its own database and
its own Redis DB index, both removed at the end, pass or fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from bem_tasks.fleet.cluster import CeleryCluster, WorkerSpec, free_port
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("BEM_FLEET_IT_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BEM_FLEET_IT_REDIS", "redis://127.0.0.1:6379")
CLAIM_KEY = "bem_fleet_it:claimed_by"

# The two workers of the test cluster: every device class is served by exactly one of them.
WORKERS = (
    WorkerSpec("cpu_rtx", ("cpu", "rtx4090_24gb"), concurrency=2),
    WorkerSpec("h100", ("h100_80gb",), concurrency=2),
)

# Faster than production defaults, so a run is not dominated by polling intervals.
FAST = {
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
    "AIRFLOW__SCHEDULER__POOL_METRICS_INTERVAL": "2",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
}


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg2

    conn = psycopg2.connect(PG_URL, connect_timeout=5)
    conn.autocommit = True
    return conn


def _sqlalchemy_url(dbname: str) -> str:
    from psycopg2.extensions import parse_dsn

    dsn = parse_dsn(PG_URL)
    user = dsn.get("user", "postgres")
    password = f":{dsn['password']}" if dsn.get("password") else ""
    host, port = dsn.get("host", "127.0.0.1"), dsn.get("port", "5432")
    return f"postgresql+psycopg2://{user}{password}@{host}:{port}/{dbname}"


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A fresh database for the Airflow metadata; dropped at the end. Yields its SQLAlchemy URL."""
    try:
        admin = _pg_admin()
    except Exception as exc:
        unavailable(f"PostgreSQL is unreachable at {PG_URL}: {exc}".strip())
    name = f"bem_fleet_it_{os.getpid()}_{secrets.token_hex(4)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _sqlalchemy_url(name)
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """An empty Redis DB index claimed for this session; flushed at the end. Yields its URL."""
    import redis

    token = f"{os.getpid()}:{secrets.token_hex(4)}"
    try:
        probe = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        probe.ping()
        n_dbs = int(probe.config_get("databases").get("databases") or 16)
    except Exception as exc:
        unavailable(f"Redis is unreachable at {REDIS_URL}: {exc}".strip())
    # DB 0 is the usual default of other users; take the first empty index after it. SET NX
    # makes the claim atomic, so two sessions never share one.
    for index in range(1, n_dbs):
        client = redis.Redis.from_url(f"{REDIS_URL}/{index}", socket_timeout=5)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, token, nx=True):
            break
        client.close()
    else:
        pytest.fail(f"no empty Redis DB index at {REDIS_URL} (1..{n_dbs - 1} all hold keys)")
    try:
        yield f"{REDIS_URL}/{index}"
    finally:
        if client.get(CLAIM_KEY) == token.encode():
            client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def celery_cluster(
    postgres_db: str, redis_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryCluster]:
    """The cluster, prepared and healthy; stopped at the end of the session, pass or fail."""
    base = tmp_path_factory.mktemp("celery_cluster")
    cluster = CeleryCluster(
        project=ROOT,
        home=base / "airflow_home",
        database_url=postgres_db,
        broker_url=redis_db,
        workers=WORKERS,
        port=free_port(),
        config_path=ROOT / "configs" / "bem_fleet_architecture.yml",
        artifact_root=base / "artifacts",
        lock_dir=base / "locks",
        deployment_profile="full",
        extra_env=FAST,
        triggerer=True,
    )
    cluster.prepare()
    try:
        cluster.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
