"""Alerts reach a real local webhook as JSON, are always logged, and never raise."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from bem_tasks.config.schema import Alerts
from bem_tasks.fleet.alerts import promotion_alerts, send_alert, task_failure_alert


class Webhook:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(
                    {"path": self.path, "type": self.headers["Content-Type"], **json.loads(body)}
                )
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/bem"


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("BEM_TEST_WEBHOOK", hook.url)
    yield hook
    hook.server.shutdown()


ALERTS = Alerts(webhook_url_env="BEM_TEST_WEBHOOK", timeout_s=5)


def test_a_task_failure_posts_json_to_the_webhook(
    webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "bem_tasks.config.loader.load_fleet",
        lambda: SimpleNamespace(arch=SimpleNamespace(operations=SimpleNamespace(alerts=ALERTS))),
    )
    context = {
        "dag": SimpleNamespace(dag_id="bem_fleet"),
        "run_id": "manual__1",
        "task_instance": SimpleNamespace(
            task_id="mission_a.evaluate", map_index=1, try_number=3, log_url="http://x/log"
        ),
        "exception": RuntimeError("out of memory"),
    }
    task_failure_alert(context)
    (post,) = webhook.posts
    assert post["path"] == "/hooks/bem" and post["type"] == "application/json"
    assert post["event"] == "task_failure" and post["source"] == "bem-fleet"
    assert (post["dag_id"], post["run_id"], post["task_id"]) == (
        "bem_fleet",
        "manual__1",
        "mission_a.evaluate",
    )
    assert post["map_index"] == 1 and post["try_number"] == 3
    assert "out of memory" in post["message"] and "out of memory" in post["error"]


def test_rejected_and_error_decisions_alert_promoted_does_not(webhook: Webhook) -> None:
    report = {
        "decisions": [
            {"mission": "mission_a", "decision": "PROMOTED", "gates": []},
            {
                "mission": "mission_b",
                "decision": "REJECTED",
                "gates": [
                    {"gate": "time_to_fix", "status": "failed"},
                    {"gate": "rollback_count", "status": "passed"},
                ],
            },
            {"mission": "mission_c", "decision": "ERROR", "error": "no records", "gates": []},
        ]
    }
    promotion_alerts(ALERTS, report, run_id="gates_1")
    assert [(p["event"], p["mission"]) for p in webhook.posts] == [
        ("rejected", "mission_b"),
        ("error", "mission_c"),
    ]
    assert webhook.posts[0]["failed_gates"] == ["time_to_fix"]
    assert "no records" in webhook.posts[1]["message"]


def test_without_a_webhook_alerts_are_logged_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bem_fleet.alerts"):
        payload = send_alert(Alerts(), "health", "disk almost full", free_gb=1.5)
    assert payload["free_gb"] == 1.5
    assert "ALERT health: disk almost full" in caplog.text


def test_events_not_configured_are_not_posted(webhook: Webhook) -> None:
    send_alert(ALERTS.model_copy(update={"events": ("task_failure",)}), "health", "x")
    assert webhook.posts == []


def test_an_unreachable_or_failing_webhook_is_logged_not_raised(
    webhook: Webhook, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook.status = 500
    with caplog.at_level(logging.ERROR, logger="bem_fleet.alerts"):
        send_alert(ALERTS, "error", "gates failed")
    assert len(webhook.posts) == 1 and "not posted to the webhook" in caplog.text
    monkeypatch.setenv("BEM_TEST_WEBHOOK", "http://127.0.0.1:9/nothing-listens")
    send_alert(ALERTS, "error", "again")  # connection refused: logged
    assert caplog.text.count("not posted") == 2
