"""Airflow plugin: the BEM Fleet dashboard, a page in the Airflow UI at /bem-fleet/.

The api-server mounts this FastAPI app without Airflow's login in front of it, so every route
depends on `can_read_fleet`: Airflow's own `requires_access_dag`, which authenticates the caller
(bearer token or the UI's `_token` cookie; none is 401, a bad one 403) and then asks the
configured auth manager whether that user may read the `bem_fleet` DAG (FAB: "can read" on
"DAG:bem_fleet" or on all DAGs), 403 if not. Any valid identity is not enough: the page shows the
fleet's artifacts (metrics, reports, plots), which are the DAG's data. The OpenAPI schema and its
/docs and /redoc pages are off: they would describe the routes to anyone, without a token.
"""

from __future__ import annotations

import functools
from pathlib import Path

from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.dashboard import (
    artifact_png,
    fleet_overview,
    mission_page,
    render_html,
    render_mission_html,
)
from bem_tasks.fleet.runs import FLEET_DAG_ID, GATES_DAG_ID
from bem_tasks.fleet.sqlite_writes import SerializeSqliteWrites


@functools.cache
def _config() -> FleetConfig:
    return load_fleet()  # once per api-server process, not on every (auto-refreshed) request


def _artifact_root() -> Path:
    return _config().artifact_root  # BEM_FLEET_ARTIFACT_ROOT, else the config's


can_read_fleet = requires_access_dag("GET", param_dag_id=FLEET_DAG_ID)

app = FastAPI(
    title="BEM Fleet dashboard",
    dependencies=[Depends(can_read_fleet)],
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


@app.get("/", response_class=HTMLResponse)
def page(refresh: int = Query(30, ge=0, le=3600, description="reload every N s; 0 = never")) -> str:
    return render_html(fleet_overview(_artifact_root()), refresh_s=refresh)


@app.get("/api/overview")
def overview() -> dict:
    return fleet_overview(_artifact_root())


def _known(mission: str) -> str:
    if mission not in _config().arch.missions:
        raise HTTPException(404, f"unknown mission {mission!r}")
    return mission


@app.get("/mission/{mission}", response_class=HTMLResponse)
def mission(mission: str) -> str:
    return render_mission_html(mission_page(_artifact_root(), _known(mission)))


@functools.lru_cache(maxsize=32)
def _trend_png(root: Path, mission: str, reports: tuple[tuple[str, float], ...]) -> bytes:
    # keyed by the gates reports' paths and mtimes: a refresh redraws only after a new report
    from bem_tasks.fleet.trends import collect_trends, trend_png

    points = [p for p in collect_trends(root)[0] if p.mission == mission]
    return trend_png(points, mission) if points else b""


@app.get("/mission/{mission}/trend.png")
def trend(mission: str) -> Response:
    root = _artifact_root()
    reports = tuple(
        sorted(
            (str(p), p.stat().st_mtime)
            for p in root.glob(f"{GATES_DAG_ID}/*/promotion_report.json")
        )
    )
    image = _trend_png(root, _known(mission), reports)
    if not image:
        raise HTTPException(404, f"no gates run has judged {mission} yet")
    return Response(image, media_type="image/png")


@app.get("/file/{relative:path}")
def artifact_file(relative: str) -> FileResponse:
    path = artifact_png(_artifact_root(), relative)
    if path is None:
        raise HTTPException(404, "not a PNG under the artifact root")
    return FileResponse(path, media_type="image/png")


class BemFleetPlugin(AirflowPlugin):
    name = "bem_fleet"
    fastapi_apps = [{"app": app, "url_prefix": "/bem-fleet", "name": "BEM Fleet dashboard"}]
    # Not the dashboard's, but this is the project's one plugin: with SQLite (the embedded
    # engine) the API server runs state-changing requests one at a time (the module says why).
    fastapi_root_middlewares = [
        {"middleware": SerializeSqliteWrites, "args": [], "kwargs": {}, "name": "sqlite_writes"}
    ]
    external_views = [
        {"name": "BEM Fleet", "href": "/bem-fleet/", "destination": "nav", "url_route": "bem-fleet"}
    ]
