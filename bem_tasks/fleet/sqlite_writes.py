"""One state-changing API request at a time when Airflow's metadata database is SQLite.

Airflow 3.3's audit-log dependency (``action_logging`` in airflow/api_fastapi/logging) commits
its ``INSERT INTO log`` synchronously on the API server's event loop. With SQLite, that commit
waits (up to the 5 s busy timeout) for the write lock, which another request may hold: a
trigger's transaction that flushed its ``dag_run`` row in a worker thread and commits in its
session dependency's teardown, which the blocked event loop never gets to run. Each request
in a burst then costs the loop 5 s; 20 triggers at once through the REST API stalled the
embedded engine for 30-90 s (every client timed out, the scheduler's heartbeat failed on
"database is locked"), measured with bench/load_test.py (docs/reliability.md, section 8; D39).

SQLite takes one writer at a time anyway, so the embedded engine loses nothing by running
requests that may write (every method but GET, HEAD and OPTIONS) one after another, each to
its end (response sent and dependencies closed). Reads are not held. With any other database
(the cluster's PostgreSQL) the middleware passes everything through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})


def metadata_db_is_sqlite() -> bool:
    from airflow.configuration import conf

    return conf.get("database", "sql_alchemy_conn").startswith("sqlite")


class SerializeSqliteWrites:
    """ASGI middleware (an Airflow plugin's ``fastapi_root_middlewares`` entry)."""

    def __init__(self, app: ASGIApp, enabled: bool | None = None) -> None:
        self.app = app
        self.enabled = metadata_db_is_sqlite() if enabled is None else enabled
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if not self.enabled or scope["type"] != "http" or scope["method"] in READ_ONLY:
            await self.app(scope, receive, send)
            return
        async with self._lock:
            await self.app(scope, receive, send)
