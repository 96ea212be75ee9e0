"""Alerts: a task failure, a REJECTED or ERROR promotion and a failed health check are logged, and
posted as JSON to the webhook named in ``operations.alerts`` when one is configured.

The webhook URL is a secret: the config names the environment variable or the Airflow connection
that holds it. No alert config means log only. Posting never raises: an alert that cannot be
delivered is logged with the reason, and the failure it reports stays the task's own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import httpx

from bem_tasks.config.schema import AlertEvent, Alerts
from bem_tasks.io import utc_now

log = logging.getLogger("bem_fleet.alerts")


def webhook_url(alerts: Alerts) -> str | None:
    """The configured webhook, from the environment or an Airflow connection; None: log only."""
    if alerts.webhook_url_env:
        url = os.environ.get(alerts.webhook_url_env)
        if url:
            return url
        log.warning(
            "operations.alerts.webhook_url_env: %s is not set; alerts are logged only",
            alerts.webhook_url_env,
        )
    if alerts.webhook_conn_id:
        from airflow.sdk import Connection

        # an http connection: its URI is the webhook (scheme, host, port and path)
        return str(Connection.get(alerts.webhook_conn_id).get_uri())
    return None


def send_alert(alerts: Alerts, event: AlertEvent, message: str, **details: Any) -> dict[str, Any]:
    """Log the alert; post it when the event is configured and a webhook is set."""
    payload = {"source": "bem-fleet", "event": event, "message": message, "at": utc_now()}
    payload |= details
    log.warning("ALERT %s: %s %s", event, message, details or "")
    if event not in alerts.events:
        return payload
    try:
        url = webhook_url(alerts)
    except Exception as exc:  # noqa: BLE001 - e.g. a missing connection: logged, not raised
        log.error("alert %s not posted: webhook unavailable (%s)", event, exc)
        return payload
    if url is None:
        return payload
    try:
        response = httpx.post(url, json=payload, timeout=alerts.timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        log.error("alert %s not posted to the webhook: %s", event, exc)
    return payload


def task_failure_alert(context: Mapping[str, Any]) -> None:
    """``on_failure_callback`` of every fleet task."""
    from bem_tasks.config.loader import load_fleet

    ti = context.get("task_instance") or context.get("ti")
    dag = context.get("dag")
    exc = context.get("exception")
    send_alert(
        load_fleet().arch.operations.alerts,
        "task_failure",
        f"{getattr(dag, 'dag_id', '?')}.{getattr(ti, 'task_id', '?')} failed: {exc}",
        dag_id=getattr(dag, "dag_id", None),
        run_id=context.get("run_id"),
        task_id=getattr(ti, "task_id", None),
        map_index=getattr(ti, "map_index", None),
        try_number=getattr(ti, "try_number", None),
        log_url=getattr(ti, "log_url", None),
        error=repr(exc) if exc is not None else None,
    )


def promotion_alerts(alerts: Alerts, report: Mapping[str, Any], *, run_id: str) -> list[dict]:
    """One alert per REJECTED or ERROR decision of a gates run."""
    sent = []
    for d in report["decisions"]:
        if d["decision"] not in ("REJECTED", "ERROR"):
            continue
        event: AlertEvent = "rejected" if d["decision"] == "REJECTED" else "error"
        failed = [g["gate"] for g in d["gates"] if g["status"] != "passed"]
        sent.append(
            send_alert(
                alerts,
                event,
                f"{d['mission']}: {d['decision']}" + (f" ({d['error']})" if d.get("error") else ""),
                mission=d["mission"],
                decision=d["decision"],
                failed_gates=failed,
                run_id=run_id,
            )
        )
    return sent
