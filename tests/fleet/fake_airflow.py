"""Helpers for tests that talk to a fake Airflow API through httpx.MockTransport."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx

from bem_tasks.fleet.api import AirflowApi


def fake_jwt(exp: float | None, sub: str = "admin") -> str:
    """An unsigned token shaped like Airflow's JWT (header.payload.signature, base64url)."""

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims: dict = {"sub": sub}
    if exp is not None:
        claims["exp"] = exp
    return f"{part({'alg': 'HS512', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def with_token(handle: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    """``handle`` behind a ``POST /auth/token`` that accepts admin/pw (exp far away)."""

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            body = json.loads(request.content)
            if body != {"username": "admin", "password": "pw"}:
                return httpx.Response(401, json={"detail": "Invalid credentials"})
            return httpx.Response(201, json={"access_token": fake_jwt(4e9)})
        return handle(request)

    return httpx.MockTransport(serve)


def fake_api(handle: Callable[[httpx.Request], httpx.Response]) -> AirflowApi:
    return AirflowApi("http://airflow.test", "admin", "pw", transport=with_token(handle))
