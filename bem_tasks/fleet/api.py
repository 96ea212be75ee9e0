"""The one client of Airflow's REST API (v2) that `make run`, the cluster and the ops commands use.

    with AirflowApi("http://127.0.0.1:8080", "admin", password) as api:
        dag = api.get(f"/dags/{dag_id}")              # a JSON object, status checked
        api.patch(f"/dags/{dag_id}", {"is_paused": True})

- The token comes from ``POST /auth/token`` with the given credentials and is fetched again
  ``refresh_margin_s`` before the JWT's ``exp`` (read from the token, not verified: the server
  does that), so a run followed for longer than ``[api_auth] jwt_expiration_time`` (24 h by
  default) keeps working. A 401 with a token believed valid (a restarted server with a new JWT
  secret) is retried once with a fresh token.
- Every answer's status is checked before its body is read; an unexpected one raises
  ``AirflowApiError`` naming the request, the statuses expected and the response body.
- Paths are relative to ``/api/v2``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

API_PREFIX = "/api/v2"
# The cluster's convention (docker-compose.yaml, .env.example): the admin user (FAB role Admin).
USER_ENV = "BEM_FLEET_ADMIN_USERNAME"
PASSWORD_ENV = "BEM_FLEET_ADMIN_PASSWORD"  # noqa: S105 (the variable's name, not a secret)
BODY_LIMIT = 4000  # characters of a response body quoted in an error


class AirflowApiError(RuntimeError):
    """An answer of the Airflow API other than the one expected (the body is in the message)."""

    def __init__(
        self, method: str, url: str, status: int, body: str, expected: Collection[int] | str
    ) -> None:
        self.method, self.url, self.status, self.body = method, url, status, body
        want = expected if isinstance(expected, str) else " or ".join(map(str, sorted(expected)))
        shown = body if len(body) <= BODY_LIMIT else body[:BODY_LIMIT] + " ...(cut)"
        super().__init__(
            f"{method} {url}: HTTP {status}, expected {want}; response body: {shown or '(empty)'}"
        )


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (seconds since the epoch) of a JWT, or None when it has none.

    The signature is not checked: the client only needs to know when to ask for a new token.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError(f"not a JWT (expected header.payload.signature, got {len(parts)} parts)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a JWT: its payload is not base64url JSON ({exc})") from exc
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def health(url: str, timeout_s: float = 5, transport: httpx.BaseTransport | None = None) -> dict:
    """``GET /api/v2/monitor/health`` (no login needed): each component's status."""
    with httpx.Client(base_url=url, timeout=timeout_s, transport=transport) as http:
        resp = http.get(f"{API_PREFIX}/monitor/health")
    if resp.status_code != 200:
        raise AirflowApiError("GET", str(resp.request.url), resp.status_code, resp.text, (200,))
    body: dict = resp.json()
    return body


class AirflowApi:
    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        *,
        timeout_s: float = 30,
        refresh_margin_s: float = 60,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self._password = password
        self.refresh_margin_s = refresh_margin_s
        self._clock = clock
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport)
        self._token: str | None = None
        self._expires_at: float | None = None
        self.tokens_fetched = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, url: str, **kwargs: Any) -> AirflowApi:
        """Credentials from BEM_FLEET_ADMIN_USERNAME (default ``admin``) and
        BEM_FLEET_ADMIN_PASSWORD, as the docker-compose cluster's `.env` holds them."""
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise ValueError(
                f"{url}: no password for the Airflow API; expected it in ${PASSWORD_ENV} "
                f"(and the user in ${USER_ENV}, default admin), as in the cluster's .env"
            )
        return cls(url, os.environ.get(USER_ENV) or "admin", password, **kwargs)

    @classmethod
    def from_password_file(cls, url: str, path: Path, **kwargs: Any) -> AirflowApi:
        """The first user of a SimpleAuthManager password file (``{"admin": "..."}``)."""
        try:
            text = path.read_text()
            if not text.strip():  # `make run` creates it empty (0600) before Airflow fills it
                raise FileNotFoundError
            users = json.loads(text)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no SimpleAuthManager password file (Airflow writes it when it first "
                "starts: run `make run`, or give --url and the credentials in the environment)"
            ) from None
        if not isinstance(users, dict) or not users:
            raise ValueError(f"{path}: expected a JSON object {{user: password}}, got {users!r}")
        user, password = next(iter(users.items()))
        return cls(url, str(user), str(password), **kwargs)

    def __enter__(self) -> AirflowApi:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ token

    def token(self) -> str:
        """A token valid for at least ``refresh_margin_s`` more seconds."""
        if self._token is None or (
            self._expires_at is not None
            and self._clock() >= self._expires_at - self.refresh_margin_s
        ):
            self._fetch_token()
        assert self._token is not None
        return self._token

    def _fetch_token(self) -> None:
        resp = self._http.post(
            "/auth/token", json={"username": self.username, "password": self._password}
        )
        if resp.status_code not in (200, 201):
            raise AirflowApiError(
                "POST", f"{self.url}/auth/token (user {self.username})", resp.status_code,
                resp.text, (200, 201),
            )  # fmt: skip
        token = _json(resp, "POST").get("access_token")
        if not isinstance(token, str):
            raise AirflowApiError(
                "POST", f"{self.url}/auth/token", resp.status_code, resp.text,
                "a JSON object with access_token",
            )  # fmt: skip
        self._token, self._expires_at = token, jwt_expiry(token)
        self.tokens_fetched += 1

    # ------------------------------------------------------------------ requests

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        expect: Collection[int] = (200,),
    ) -> httpx.Response:
        """``method`` on ``/api/v2`` + ``path``; raises AirflowApiError unless the status is in
        ``expect``."""
        for attempt in (0, 1):
            resp = self._http.request(
                method,
                API_PREFIX + path,
                json=json,
                params=params,
                headers={"Authorization": f"Bearer {self.token()}"},
            )
            if resp.status_code == 401 and attempt == 0 and 401 not in expect:
                self._token = None  # rejected before its exp: fetch a new one, once
                continue
            break
        if resp.status_code not in expect:
            raise AirflowApiError(
                method, str(resp.request.url), resp.status_code, resp.text, expect
            )
        return resp

    def get(self, path: str, params: Any = None) -> dict:
        return _json(self.request("GET", path, params=params), "GET")

    def post(self, path: str, json: Any, expect: Collection[int] = (200,)) -> dict:
        return _json(self.request("POST", path, json=json, expect=expect), "POST")

    def patch(self, path: str, json: Any, params: Any = None) -> dict:
        return _json(self.request("PATCH", path, json=json, params=params), "PATCH")

    def exists(self, path: str) -> bool:
        """True on 200, False on 404 (anything else raises)."""
        return self.request("GET", path, expect=(200, 404)).status_code == 200

    def pages(self, path: str, key: str, params: dict | None = None, limit: int = 100) -> Iterator[dict]:  # fmt: skip
        """Every item of a paginated list (``key``: ``dags``, ``dag_runs``, ...)."""
        offset = 0
        while True:
            body = self.get(path, {**(params or {}), "limit": limit, "offset": offset})
            items = body.get(key)
            if not isinstance(items, list):
                raise AirflowApiError(
                    "GET", self.url + API_PREFIX + path, 200, str(body)[:BODY_LIMIT],
                    f"a JSON object with a list '{key}'",
                )  # fmt: skip
            yield from items
            offset += len(items)
            if not items or offset >= int(body.get("total_entries", offset)):
                return


def _json(resp: httpx.Response, method: str) -> dict:
    try:
        body = resp.json()
    except ValueError:
        raise AirflowApiError(
            method, str(resp.request.url), resp.status_code, resp.text, "a JSON body"
        ) from None
    if not isinstance(body, dict):
        raise AirflowApiError(
            method, str(resp.request.url), resp.status_code, resp.text, "a JSON object"
        )
    return body
