"""The API server's SQLite write serialiser (bem_tasks/fleet/sqlite_writes.py, D39)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bem_tasks.fleet.sqlite_writes import SerializeSqliteWrites, metadata_db_is_sqlite


def _most_at_once(enabled: bool, method: str, requests: int = 8) -> int:
    """Send ``requests`` concurrent requests through the middleware; the most that were inside
    the app at one time."""
    inside, most = 0, 0

    async def app(scope: dict, receive: Any, send: Any) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.01)  # a request that yields to the loop, as a real one does
        inside -= 1

    async def burst() -> None:
        middleware = SerializeSqliteWrites(app, enabled=enabled)
        scope = {"type": "http", "method": method, "path": "/api/v2/dags/bem_fleet/dagRuns"}
        await asyncio.gather(*(middleware(dict(scope), None, None) for _ in range(requests)))

    asyncio.run(burst())
    return most


@pytest.mark.parametrize("method", ["POST", "PATCH", "PUT", "DELETE"])
def test_requests_that_may_write_run_one_at_a_time_on_sqlite(method: str) -> None:
    assert _most_at_once(True, method) == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reads_are_not_held(method: str) -> None:
    assert _most_at_once(True, method) == 8


def test_other_databases_pass_everything_through() -> None:
    assert _most_at_once(False, "POST") == 8


def test_the_database_is_read_from_airflow_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite:////tmp/airflow.db")
    assert metadata_db_is_sqlite()
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql+psycopg2://u@h/db")
    assert not metadata_db_is_sqlite()


def test_the_project_plugin_installs_it_on_the_api_server_root() -> None:
    """What Airflow's init_plugins reads: the root middlewares of the project's plugin."""
    from tests.fleet.test_dashboard import load_plugin

    entries = load_plugin().BemFleetPlugin.fastapi_root_middlewares
    assert [e["middleware"] for e in entries] == [SerializeSqliteWrites]
