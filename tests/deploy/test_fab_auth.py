"""The cluster's auth against the real FAB auth manager: a real api-server, real JWTs, no mocks.

What docker-compose.yaml's airflow-init does, on SQLite in a temporary AIRFLOW_HOME: `airflow db
migrate` (FAB's tables too, FAB being the auth manager), `bem-fleet users sync` (the admin and the
CI user from the environment), then `airflow api-server` with this repository's DAGs and plugin.
Two more users stand for the cases in between: `viewer` (FAB's built-in Viewer: reads every DAG,
triggers none) and `gates` (a role that reads only bem_promotion_gates). Tokens come from FAB's
`POST /auth/token`, as CI gets them.

About 30 s on two cores (five Airflow processes start one after the other), hence the e2e marker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bem_tasks.fleet.cluster import free_port
from tests.conftest import unavailable

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
PASSWORDS = {"admin": "admin-pw-1", "ci": "ci-pw-2", "viewer": "viewer-pw-3", "gates": "gates-pw-4"}

# The two users airflow-init does not make, through FAB's own security manager.
EXTRA_USERS = """
from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder
with get_application_builder() as ab:
    sm = ab.sm
    gates = sm.add_role("gates_reader")
    sm.add_permission_to_role(gates, sm.create_permission("can_read", "DAG:bem_promotion_gates"))
    for name, role in [("viewer", "Viewer"), ("gates", "gates_reader")]:
        assert sm.add_user(name, name, "t", name + "@localhost", sm.find_role(role), PW[name])
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__AUTH_MANAGER": FAB,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt-secret-" + "0" * 32,
            "AIRFLOW__API__SECRET_KEY": "test-only-secret-key",
            "BEM_FLEET_CONFIG": str(ROOT / "configs" / "bem_fleet_architecture.yml"),
            "BEM_FLEET_ARTIFACT_ROOT": str(home / "artifacts"),
            "BEM_FLEET_ADMIN_PASSWORD": PASSWORDS["admin"],
            "BEM_FLEET_CI_USERNAME": "ci",
            "BEM_FLEET_CI_PASSWORD": PASSWORDS["ci"],
            "WANDB_MODE": "offline",
        }
    )
    return env


def _run(env: dict[str, str], *cmd: str) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("fab_home")
    env = _env(home)
    _run(env, str(BIN / "airflow"), "db", "migrate")
    synced = _run(env, str(BIN / "bem-fleet"), "users", "sync")
    assert "user admin: created with role Admin" in synced
    assert "user ci: created with role bem_fleet_ci" in synced
    _run(env, sys.executable, "-c", f"PW = {PASSWORDS!r}\n{EXTRA_USERS}")
    _run(env, str(BIN / "airflow"), "dags", "reserialize")  # bem_fleet in the DB, to trigger
    port = free_port()
    with open(home / "api-server.log", "wb") as log:
        cmd = ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        server = subprocess.Popen(
            [str(BIN / "airflow"), *cmd],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v2/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (home / "api-server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "api-server did not come up in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _token(api: str, user: str, password: str | None = None) -> dict[str, str]:
    r = httpx.post(
        f"{api}/auth/token",
        json={"username": user, "password": PASSWORDS[user] if password is None else password},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _trigger(api: str, dag_id: str, headers: dict[str, str]) -> httpx.Response:
    body = {"logical_date": None, "conf": {"profile": "smoke"}}
    return httpx.post(f"{api}/api/v2/dags/{dag_id}/dagRuns", json=body, headers=headers)


def test_a_wrong_password_gets_no_token(api: str) -> None:
    r = httpx.post(f"{api}/auth/token", json={"username": "ci", "password": "not-it"})
    assert r.status_code == 401


def test_the_ci_user_triggers_bem_fleet_and_follows_the_run_but_nothing_else(api: str) -> None:
    ci = _token(api, "ci")
    r = _trigger(api, "bem_fleet", ci)
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["dag_id"] == "bem_fleet" and run["conf"] == {"profile": "smoke"}
    run_url = f"{api}/api/v2/dags/bem_fleet/dagRuns/{run['dag_run_id']}"
    assert httpx.get(run_url, headers=ci).json()["state"] == "queued"
    assert httpx.get(f"{run_url}/taskInstances", headers=ci).status_code == 200
    # Another DAG of the same file: neither triggered nor read.
    assert _trigger(api, "bem_promotion_gates", ci).status_code == 403
    assert httpx.get(f"{api}/api/v2/dags/bem_promotion_gates", headers=ci).status_code == 403
    listed = httpx.get(f"{api}/api/v2/dags", headers=ci).json()["dags"]
    assert [d["dag_id"] for d in listed] == ["bem_fleet"]
    # Nor any admin business.
    assert httpx.get(f"{api}/api/v2/pools", headers=ci).status_code == 403
    assert httpx.delete(f"{api}/api/v2/dags/bem_fleet", headers=ci).status_code == 403


def test_reading_every_dag_is_not_triggering_one(api: str) -> None:
    viewer = _token(api, "viewer")
    assert httpx.get(f"{api}/api/v2/dags/bem_fleet", headers=viewer).status_code == 200
    assert _trigger(api, "bem_fleet", viewer).status_code == 403
    assert _trigger(api, "bem_fleet", _token(api, "admin")).status_code == 200


@pytest.mark.parametrize("path", ["/", "/api/overview", "/mission/mission_a"])
def test_the_dashboard_needs_read_access_to_bem_fleet(api: str, path: str) -> None:
    url = f"{api}/bem-fleet{path}"
    assert httpx.get(url).status_code == 401  # no token
    assert httpx.get(url, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    # A valid token whose user may read another DAG only: an identity is not enough.
    assert httpx.get(url, headers=_token(api, "gates")).status_code == 403
    for reader in ("ci", "viewer", "admin"):
        assert httpx.get(url, headers=_token(api, reader)).status_code == 200, reader


def test_the_dashboard_publishes_no_schema_or_docs(api: str) -> None:
    admin = _token(api, "admin")
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{api}/bem-fleet{path}", headers=admin).status_code == 404, path


def test_the_readme_ci_example_triggers_as_the_ci_user(api: str) -> None:
    """The README's token() and api() shell functions, run as they are, against this server."""
    if not (shutil.which("jq") and shutil.which("curl")):
        unavailable("the README's example needs jq and curl")
    text = (ROOT / "README.md").read_text()
    block = text.split("### Trigger a run from CI")[1].split("```bash\n")[1].split("```")[0]
    functions = block.split("RUN_ID=")[0]  # AIRFLOW=..., token(), api()
    script = f"""{functions}
AIRFLOW={api}
api -X POST "$AIRFLOW/api/v2/dags/bem_fleet/dagRuns" -d '{{"logical_date": null}}'
"""
    env = {"PATH": os.environ["PATH"], "BEM_FLEET_CI_USERNAME": "ci"}
    done = subprocess.run(
        ["bash", "-c", script],
        env={**env, "BEM_FLEET_CI_PASSWORD": PASSWORDS["ci"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dag_id"] == "bem_fleet"
    # With a wrong password there is no token, and the API refuses (curl -f: exit 22).
    refused = subprocess.run(
        ["bash", "-c", script],
        env={**env, "BEM_FLEET_CI_PASSWORD": "wrong"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 22 and refused.stdout == ""
