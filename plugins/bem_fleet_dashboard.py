"""Airflow plugin: the BEM Fleet dashboard, a page in the Airflow UI at /bem-fleet/.

The api-server mounts this FastAPI app without Airflow's login in front of it, so every route
depends on Airflow's own `get_user` (bearer token or the UI's `_token` cookie).
"""

from __future__ import annotations

import functools
from pathlib import Path

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.dashboard import fleet_overview, render_html


@functools.cache
def _config() -> FleetConfig:
    return load_fleet()  # once per api-server process, not on every (auto-refreshed) request


def _artifact_root() -> Path:
    return _config().artifact_root  # BEM_FLEET_ARTIFACT_ROOT, else the config's


app = FastAPI(title="BEM Fleet dashboard", dependencies=[Depends(get_user)])


@app.get("/", response_class=HTMLResponse)
def page(refresh: int = Query(30, ge=0, le=3600, description="reload every N s; 0 = never")) -> str:
    return render_html(fleet_overview(_artifact_root()), refresh_s=refresh)


@app.get("/api/overview")
def overview() -> dict:
    return fleet_overview(_artifact_root())


class BemFleetPlugin(AirflowPlugin):
    name = "bem_fleet"
    fastapi_apps = [{"app": app, "url_prefix": "/bem-fleet", "name": "BEM Fleet dashboard"}]
    external_views = [
        {"name": "BEM Fleet", "href": "/bem-fleet/", "destination": "nav", "url_route": "bem-fleet"}
    ]
