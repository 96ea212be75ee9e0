"""bem_tasks.fleet.api.AirflowApi against a fake server (httpx.MockTransport) and a fake clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

from bem_tasks.fleet.api import AirflowApi, AirflowApiError, jwt_expiry
from tests.fleet.fake_airflow import fake_api, fake_jwt

TTL = 600.0  # seconds each fake token lives


@dataclass
class TokenServer:
    """Issues tokens that expire TTL s after issue and refuses expired ones, as Airflow does."""

    now: float = 1_000_000.0
    issued: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            token = fake_jwt(self.now + TTL, sub=f"admin#{len(self.issued)}")
            self.issued.append(token)
            return httpx.Response(201, json={"access_token": token})
        token = request.headers["Authorization"].removeprefix("Bearer ")
        self.used.append(token)
        if (jwt_expiry(token) or 0) <= self.now:
            return httpx.Response(401, json={"detail": "Token expired"})
        return httpx.Response(200, json={"dag_id": "bem_fleet", "is_paused": False})


def token_api(server: TokenServer, **kw) -> AirflowApi:
    return AirflowApi(
        "http://airflow.test/",
        "admin",
        "pw",
        transport=httpx.MockTransport(server.handle),
        clock=server.clock,
        **kw,
    )


def test_the_token_is_fetched_once_and_renewed_before_it_expires() -> None:
    server = TokenServer()
    api = token_api(server, refresh_margin_s=60)

    assert api.get("/dags/bem_fleet") == {"dag_id": "bem_fleet", "is_paused": False}
    server.now += TTL - 61  # 61 s left: still used
    api.get("/dags/bem_fleet")
    assert len(server.issued) == 1 and server.used == [server.issued[0]] * 2

    server.now += 2  # 59 s left, inside the margin: a new token before the request
    api.get("/dags/bem_fleet")
    assert len(server.issued) == 2 and server.used[-1] == server.issued[1]
    assert api.tokens_fetched == 2
    # Every request was accepted: none was sent with a token the server had expired.
    server.now += TTL - 61
    api.get("/dags/bem_fleet")
    assert server.used[-1] == server.issued[1]


def test_a_token_rejected_before_its_expiry_is_replaced_once() -> None:
    """A server restarted with a new JWT secret refuses a token that has not expired yet."""
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["Authorization"])
        if len(calls) == 1:
            return httpx.Response(401, json={"detail": "Invalid JWT"})
        return httpx.Response(200, json={"ok": True})

    api = fake_api(handle)
    assert api.get("/version") == {"ok": True}
    assert len(calls) == 2 and api.tokens_fetched == 2

    calls.clear()

    def always_401(request: httpx.Request) -> httpx.Response:
        calls.append("x")
        return httpx.Response(401, json={"detail": "Invalid JWT"})

    with pytest.raises(AirflowApiError, match=r"HTTP 401, expected 200.*Invalid JWT"):
        fake_api(always_401).get("/version")
    assert len(calls) == 2  # one retry, not a loop


def test_an_unexpected_status_raises_with_the_request_and_the_body() -> None:
    detail = {"detail": "Dag Run id manual__x not found in dag bem_fleet"}
    api = fake_api(lambda request: httpx.Response(404, json=detail))

    with pytest.raises(AirflowApiError) as err:
        api.post("/dags/bem_fleet/clearTaskInstances", {"dry_run": True})

    e = err.value
    assert (e.method, e.status) == ("POST", 404)
    assert e.url == "http://airflow.test/api/v2/dags/bem_fleet/clearTaskInstances"
    assert json.loads(e.body) == detail
    assert str(e) == (
        "POST http://airflow.test/api/v2/dags/bem_fleet/clearTaskInstances: HTTP 404, "
        f"expected 200; response body: {json.dumps(detail, separators=(',', ':'))}"
    )


def test_the_status_is_checked_before_the_body_is_read() -> None:
    """An HTML error page (a proxy's 502) is reported as such, not as a JSON decode error."""
    api = fake_api(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(AirflowApiError, match=r"HTTP 502, expected 200; .*<html>Bad Gateway"):
        api.get("/dags")

    api = fake_api(lambda request: httpx.Response(200, text="<html>login</html>"))
    with pytest.raises(AirflowApiError, match=r"HTTP 200, expected a JSON body; .*login"):
        api.get("/dags")


def test_wrong_credentials_name_the_user_and_the_server_answer_never_the_password() -> None:
    api = fake_api(lambda request: httpx.Response(200, json={}))
    api._password = "not-the-password"  # noqa: SLF001
    with pytest.raises(AirflowApiError) as err:
        api.get("/dags")
    assert "POST http://airflow.test/auth/token (user admin): HTTP 401" in str(err.value)
    assert "Invalid credentials" in str(err.value)
    assert "not-the-password" not in str(err.value)


def test_exists_is_true_on_200_false_on_404_and_raises_otherwise() -> None:
    status = {"/api/v2/dags/a": 200, "/api/v2/dags/b": 404, "/api/v2/dags/c": 500}
    api = fake_api(lambda r: httpx.Response(status[r.url.path], json={"detail": "boom"}))
    assert api.exists("/dags/a") is True
    assert api.exists("/dags/b") is False
    with pytest.raises(AirflowApiError, match="HTTP 500, expected 200 or 404"):
        api.exists("/dags/c")


def test_pages_walks_every_page_of_a_list() -> None:
    dags = [{"dag_id": f"d{i}"} for i in range(7)]
    seen: list[tuple[str, str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        q = request.url.params
        seen.append((q["limit"], q["offset"], q["tags"]))
        lo = int(q["offset"])
        page = dags[lo : lo + int(q["limit"])]
        return httpx.Response(200, json={"dags": page, "total_entries": len(dags)})

    got = list(fake_api(handle).pages("/dags", "dags", {"tags": "bem-fleet"}, limit=3))
    assert [d["dag_id"] for d in got] == [f"d{i}" for i in range(7)]
    assert seen == [("3", "0", "bem-fleet"), ("3", "3", "bem-fleet"), ("3", "6", "bem-fleet")]


def test_jwt_expiry_reads_exp_and_refuses_what_is_not_a_jwt() -> None:
    assert jwt_expiry(fake_jwt(1234567890)) == 1234567890.0
    assert jwt_expiry(fake_jwt(None)) is None
    with pytest.raises(ValueError, match="not a JWT"):
        jwt_expiry("opaque-token")
    with pytest.raises(ValueError, match="not a JWT: its payload"):
        jwt_expiry("a.!!!.c")


def test_a_token_without_exp_is_kept_until_the_server_refuses_it() -> None:
    issued: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            issued.append(fake_jwt(None))
            return httpx.Response(201, json={"access_token": issued[-1]})
        return httpx.Response(200, json={})

    api = AirflowApi("http://a.test", "admin", "pw", transport=httpx.MockTransport(handle))
    for _ in range(3):
        api.get("/version")
    assert len(issued) == 1


def test_credentials_from_the_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BEM_FLEET_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ValueError, match=r"expected it in \$BEM_FLEET_ADMIN_PASSWORD"):
        AirflowApi.from_env("http://a.test")
    monkeypatch.setenv("BEM_FLEET_ADMIN_PASSWORD", "s3cret")
    monkeypatch.delenv("BEM_FLEET_ADMIN_USERNAME", raising=False)
    assert AirflowApi.from_env("http://a.test").username == "admin"
    monkeypatch.setenv("BEM_FLEET_ADMIN_USERNAME", "ops")
    assert AirflowApi.from_env("http://a.test").username == "ops"


def test_credentials_from_the_password_file(tmp_path) -> None:
    path = tmp_path / "simple_auth_manager_passwords.json.generated"
    with pytest.raises(FileNotFoundError, match="run `make run`, or give --url"):
        AirflowApi.from_password_file("http://a.test", path)
    path.write_text("")  # created by `make run` before Airflow writes the password into it
    with pytest.raises(FileNotFoundError, match="run `make run`, or give --url"):
        AirflowApi.from_password_file("http://a.test", path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"expected a JSON object \{user: password\}"):
        AirflowApi.from_password_file("http://a.test", path)
    path.write_text(json.dumps({"admin": "pw"}))
    api = AirflowApi.from_password_file(
        "http://a.test", path, transport=httpx.MockTransport(lambda r: httpx.Response(500))
    )
    assert (api.username, api._password) == ("admin", "pw")  # noqa: SLF001
