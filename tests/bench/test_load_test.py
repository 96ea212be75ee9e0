"""bench/load_test.py: its pure parts with known answers (percentiles, ok/failed/lost from API
records), the `load` profile it triggers, what it needs of `Embedded` (its own home and log
server port, a stopped child seen as stopped), and one real run of three on the embedded engine."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bem_tasks.config.loader import load_fleet

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("load_test_bench", ROOT / "bench" / "load_test.py")
assert spec and spec.loader
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # its dataclasses look their module up there
spec.loader.exec_module(bench)

Q0 = "2026-12-01T10:00:00+00:00"
Q_START = "2026-12-01T10:00:12.500000+00:00"  # 12.5 s after Q0
Q_END = "2026-12-01T10:00:20Z"  # 7.5 s after Q_START ("Z" as the API may write it)
LOAD_TASKS = {
    "plan": "success",
    "mission_a.selected": "success",
    "mission_a.prepare": "skipped",
    "mission_b.selected": "skipped",
    "mission_d.pretrain[3]": "skipped",
}


def run(state: str, **kw: str | None) -> dict:
    return {"state": state, "queued_at": Q0, "start_date": Q_START, "end_date": Q_END, **kw}


def one(trigger, listed: dict, tasks: dict | None = None):
    (rec,) = bench.classify([trigger], listed, tasks or {})
    return rec


# ----------------------------------------------------------------------------- percentiles


def test_percentile_interpolates_between_order_statistics() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # order does not matter
    assert bench.percentile(xs, 50) == pytest.approx(2.5)
    assert bench.percentile(xs, 95) == pytest.approx(3.85)  # 1 + 0.95 * 3 positions
    assert bench.percentile(xs, 0) == 1.0 and bench.percentile(xs, 100) == 4.0
    assert bench.percentile(range(1, 21), 95) == pytest.approx(19.05)  # 20 runs
    assert bench.percentile([7.0], 95) == 7.0


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(bench.percentile([], 50))
    with pytest.raises(ValueError, match="q must be within"):
        bench.percentile([1.0], 101)


def test_seconds_between_iso_timestamps() -> None:
    assert bench.seconds_between(Q0, Q_START) == pytest.approx(12.5)
    assert bench.seconds_between(Q_START, Q_END) == pytest.approx(7.5)
    assert bench.seconds_between(Q0, None) is None


# ----------------------------------------------------------------------------- classification


def test_a_finished_run_that_only_orchestrated_is_ok_with_its_latencies() -> None:
    rec = one(bench.Trigger(0, "r0"), {"r0": run("success")}, {"r0": LOAD_TASKS})
    assert (rec.outcome, rec.reason) == ("ok", "")
    assert rec.queue_s == pytest.approx(12.5) and rec.duration_s == pytest.approx(7.5)


def test_a_trigger_error_is_failed_and_keeps_the_error() -> None:
    rec = one(bench.Trigger(3, error="AirflowApiError: HTTP 409"), {})
    assert rec.outcome == "failed" and rec.run_id is None
    assert rec.reason == "trigger failed: AirflowApiError: HTTP 409"


def test_a_run_missing_from_the_list_is_lost() -> None:
    rec = one(bench.Trigger(1, "r1"), {"other": run("success")})
    assert (rec.outcome, rec.reason) == ("lost", "missing from the run list")


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_run_unfinished_at_the_deadline_is_lost(state: str) -> None:
    rec = one(bench.Trigger(2, "r2"), {"r2": run(state, start_date=None, end_date=None)})
    assert (rec.outcome, rec.reason) == ("lost", f"still {state} at the deadline")
    assert rec.queue_s is None and rec.duration_s is None


def test_a_failed_run_is_failed_and_names_its_failed_tasks() -> None:
    tasks = {**LOAD_TASKS, "mission_a.selected": "failed", "mission_a.prepare": "upstream_failed"}
    rec = one(bench.Trigger(0, "r0"), {"r0": run("failed")}, {"r0": tasks})
    assert rec.outcome == "failed"
    assert rec.failed_tasks == ["mission_a.prepare", "mission_a.selected"]
    assert rec.reason == "run failed; failed tasks: mission_a.prepare, mission_a.selected"


def test_a_successful_run_with_a_failed_task_or_without_plan_is_failed() -> None:
    tasks = {**LOAD_TASKS, "mission_b.selected": "failed"}
    rec = one(bench.Trigger(0, "r0"), {"r0": run("success")}, {"r0": tasks})
    assert rec.outcome == "failed" and "mission_b.selected" in rec.reason
    no_plan = {k: v for k, v in LOAD_TASKS.items() if k != "plan"}
    rec = one(bench.Trigger(0, "r0"), {"r0": run("success")}, {"r0": no_plan})
    assert (rec.outcome, rec.reason) == ("failed", "plan is missing")


def test_a_run_that_trained_is_failed() -> None:
    tasks = {**LOAD_TASKS, "mission_a.prepare": "success"}
    rec = one(bench.Trigger(0, "r0"), {"r0": run("success")}, {"r0": tasks})
    assert rec.outcome == "failed" and "['mission_a.prepare']" in rec.reason


def test_summary_counts_outcomes_and_the_last_line() -> None:
    triggers = [
        bench.Trigger(0, "r0"),
        bench.Trigger(1, "r1"),
        bench.Trigger(2, error="boom"),
        bench.Trigger(3, "r3"),
        bench.Trigger(4, "r4"),
    ]
    listed = {
        "r0": run("success"),
        "r1": run("success", queued_at="2026-12-01T09:59:50+00:00"),  # 22.5 s in the queue
        "r3": run("running", end_date=None),
    }
    tasks = {r: LOAD_TASKS for r in listed}
    summary = bench.summarise(bench.classify(triggers, listed, tasks))
    assert (summary.runs, summary.ok, summary.failed, summary.lost) == (5, 2, 1, 2)
    # queue latencies 12.5, 22.5 and (r3, started) 12.5: p50 12.5, p95 12.5 + 0.9 * 10
    assert summary.queue_p50_s == pytest.approx(12.5)
    assert summary.queue_p95_s == pytest.approx(21.5)
    assert summary.last_line() == "load_test: runs=5 failed=1 lost=2 queue_p95_s=21.5"


# ----------------------------------------------------------------------------- the profile


def test_the_load_profile_plans_no_mission_and_one_seed() -> None:
    from bem_tasks.fleet.dags import resolve_plan

    cfg = load_fleet(ROOT / "configs" / "bem_fleet_architecture.yml").deployment()
    assert cfg.for_profile("load").enabled_missions == []
    assert cfg.enabled_missions, "the deployment still builds every enabled mission's pipeline"
    plan = resolve_plan(cfg, dict(bench.CONF, seeds=None))
    assert plan == {"profile": "load", "missions": [], "seeds": [0]}


# ----------------------------------------------------------------------------- real run


@pytest.mark.e2e
def test_three_runs_through_the_rest_api() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_test.py"), "--runs", "3", "--timeout-s", "300"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert re.fullmatch(r"load_test: runs=3 failed=0 lost=0 queue_p95_s=\d+\.\d", last), out[-5000:]
    assert proc.returncode == 0, out[-5000:]


# ----------------------------------------------------------------------------- Embedded


def test_an_exited_child_is_not_running_though_unreaped(tmp_path: Path) -> None:
    """The load test starts the standalone itself, so once stopped it is this process's zombie:
    ``os.kill(pid, 0)`` still succeeds, and `stop` used to wait its full 30 s for it."""
    from bem_tasks.fleet.embedded import Embedded

    emb = Embedded(ROOT, airflow_home=tmp_path)
    assert emb.home == tmp_path and Embedded(ROOT).home == ROOT / ".airflow"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    emb.pid_file.write_text(str(child.pid))
    assert emb.running_pid() == child.pid
    child.kill()
    os.kill(child.pid, 0)  # a zombie until reaped
    deadline = time.monotonic() + 10
    while emb.running_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emb.running_pid() is None
    child.returncode = -9  # reaped by running_pid; keep Popen from waiting on a reused pid


def test_the_log_server_port_can_be_chosen() -> None:
    from bem_tasks.fleet.embedded import Embedded

    assert Embedded(ROOT, port=8080).log_port == 8793
    assert Embedded(ROOT, port=8793).log_port == 8794
    env = Embedded(ROOT, port=8793, log_server_port=41234).env()
    assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "41234"
