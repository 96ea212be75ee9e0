"""Load: N `bem_fleet` runs triggered at once through the REST API of the embedded default engine.

What it measures is the orchestration path (REST API, scheduler, LocalExecutor, task start-up),
not training: every run asks for the `load` profile with no missions
(``{"profile": "load", "missions": []}``), under which every mission is disabled, so a run is
`plan`, each mission's `selected` short-circuit and its skipped pipeline (docs/decisions.md, D37).

It starts its own `airflow standalone` (bem_tasks/fleet/embedded.py) in a temporary AIRFLOW_HOME,
with a temporary BEM_FLEET_ARTIFACT_ROOT and free ports, so a user's `make run` state (`.airflow/`,
`./artifacts`, port 8080) is never touched, and stops it at the end, also on an error or Ctrl-C.
The temporary folder is removed unless ``--keep`` is given or something failed (an error, a
failed or lost run): then its path is printed, with Airflow's `standalone.log` in it.
Steps: wait for `bem_fleet` to be parsed; read its pending scheduled tick once; fire the N
``POST /dags/bem_fleet/dagRuns`` at once from N threads (one pre-authenticated client each; the
first takes the tick's logical date, so unpausing starts no scheduled run with default params,
the others have logical_date null); unpause `bem_fleet`; follow every run (``GET
/dags/bem_fleet/dagRuns``, all pages) until each is finished, the deadline, or Airflow exits.
An API error after the burst (a timeout, a 5xx) is reported and the request repeated until the
deadline, so one slow answer does not end the test.

    failed     a trigger whose request failed, a run that ended `failed`, or a run that ended
               `success` with a failed task or without a successful `plan`
    lost       a run whose trigger returned a run id but that is missing from the run list, or
               did not finish by the deadline
    queue      start_date - queued_at of the API's dag run (seconds)
    duration   end_date - start_date

`bem_fleet` has max_active_runs=1: the runs are served one at a time, so the queue latency of a
run is mostly the time the runs before it took; its p95 grows with N by design.

Last line: ``load_test: runs=20 failed=0 lost=0 queue_p95_s=123.4`` (target: 20 runs, 0 failed,
0 lost). Exit status 0 only when nothing failed or was lost.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bem_tasks.fleet.api import AirflowApi, AirflowApiError  # noqa: E402
from bem_tasks.fleet.cluster import free_port  # noqa: E402
from bem_tasks.fleet.embedded import pending_tick, ti_key  # noqa: E402
from bem_tasks.fleet.runs import FLEET_DAG_ID  # noqa: E402

CONF = {"profile": "load", "missions": []}
FINISHED = ("success", "failed")
BAD_TI = ("failed", "upstream_failed")


def _orchestration(task_id: str) -> bool:
    return task_id == "plan" or task_id.endswith(".selected")


DEFAULT_TIMEOUT_S = 3600.0
POLL_S = 2.0
UNPAUSE_S = 300.0


# ----------------------------------------------------------------------------- pure parts


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), numpy's linear interpolation; nan for no values."""
    xs = list(values)
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within [0, 100], got {q}")
    return float(np.percentile(xs, q)) if xs else math.nan


def seconds_between(start: str | None, end: str | None) -> float | None:
    """``end - start`` in seconds for two ISO timestamps of the API; None when one is missing."""
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


@dataclass
class Trigger:
    """One ``POST /dagRuns``: the run id it returned, or the error it raised."""

    index: int
    run_id: str | None = None
    error: str | None = None
    logical_date: str | None = None
    sent_s: float = 0.0  # seconds after the burst started
    answered_s: float = 0.0


@dataclass
class RunRecord:
    index: int
    run_id: str | None
    outcome: str  # ok | failed | lost
    reason: str = ""
    state: str | None = None
    queued_at: str | None = None
    start_date: str | None = None
    end_date: str | None = None
    queue_s: float | None = None
    duration_s: float | None = None
    failed_tasks: list[str] = field(default_factory=list)


def classify(
    triggers: Sequence[Trigger],
    listed: Mapping[str, Mapping[str, Any]],
    task_states: Mapping[str, Mapping[str, str]],
) -> list[RunRecord]:
    """Each trigger's outcome from what the API listed.

    ``listed``: the dag runs of ``GET /dagRuns`` by run id; ``task_states``: per run id, the
    state of each task instance (``task_id`` or ``task_id[map_index]``). A finished run is ok
    when it succeeded, `plan` succeeded, no task failed and every task other than `plan` and
    the missions' `selected` was skipped (the load profile trains nothing).
    """
    out: list[RunRecord] = []
    for t in triggers:
        if t.run_id is None:
            out.append(RunRecord(t.index, None, "failed", f"trigger failed: {t.error}"))
            continue
        run = listed.get(t.run_id)
        if run is None:
            out.append(RunRecord(t.index, t.run_id, "lost", "missing from the run list"))
            continue
        rec = RunRecord(
            t.index,
            t.run_id,
            "ok",
            state=run.get("state"),
            queued_at=run.get("queued_at"),
            start_date=run.get("start_date"),
            end_date=run.get("end_date"),
            queue_s=seconds_between(run.get("queued_at"), run.get("start_date")),
            duration_s=seconds_between(run.get("start_date"), run.get("end_date")),
        )
        tis = task_states.get(t.run_id, {})
        rec.failed_tasks = sorted(k for k, s in tis.items() if s in BAD_TI)
        if rec.state not in FINISHED:
            rec.outcome, rec.reason = "lost", f"still {rec.state} at the deadline"
        elif rec.state == "failed":
            rec.outcome = "failed"
            rec.reason = f"run failed; failed tasks: {', '.join(rec.failed_tasks) or 'none'}"
        elif rec.failed_tasks:
            rec.outcome = "failed"
            rec.reason = f"run succeeded but tasks failed: {', '.join(rec.failed_tasks)}"
        elif tis.get("plan") != "success":
            rec.outcome, rec.reason = "failed", f"plan is {tis.get('plan') or 'missing'}"
        elif ran := sorted(k for k, s in tis.items() if not _orchestration(k) and s != "skipped"):
            rec.outcome = "failed"
            rec.reason = f"the load profile trains nothing, but these were not skipped: {ran}"
        out.append(rec)
    return out


@dataclass
class Summary:
    runs: int
    ok: int
    failed: int
    lost: int
    queue_p50_s: float
    queue_p95_s: float
    duration_p50_s: float
    duration_p95_s: float

    def last_line(self) -> str:
        return (
            f"load_test: runs={self.runs} failed={self.failed} lost={self.lost} "
            f"queue_p95_s={self.queue_p95_s:.1f}"
        )


def summarise(records: Sequence[RunRecord]) -> Summary:
    queue = [r.queue_s for r in records if r.queue_s is not None]
    duration = [r.duration_s for r in records if r.duration_s is not None]
    return Summary(
        runs=len(records),
        ok=sum(r.outcome == "ok" for r in records),
        failed=sum(r.outcome == "failed" for r in records),
        lost=sum(r.outcome == "lost" for r in records),
        queue_p50_s=percentile(queue, 50),
        queue_p95_s=percentile(queue, 95),
        duration_p50_s=percentile(duration, 50),
        duration_p95_s=percentile(duration, 95),
    )


def table(records: Sequence[RunRecord]) -> list[str]:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [f"{'#':>3}  {'outcome':<7} {'state':<8} {'queue_s':>8} {'run_s':>7}  run id / reason"]
    for r in sorted(records, key=lambda r: (r.start_date or "~", r.index)):  # served order
        text = r.run_id or "-"
        if r.reason:
            text += f"  ({r.reason})"
        lines.append(
            f"{r.index:>3}  {r.outcome:<7} {r.state or '-':<8} {num(r.queue_s):>8} "
            f"{num(r.duration_s):>7}  {text}"
        )
    return lines


# ----------------------------------------------------------------------------- the real run


def fire(clients: Sequence[AirflowApi], tick: str | None) -> list[Trigger]:
    """One POST per client, all released at once by a barrier; the first takes ``tick``."""
    triggers = [Trigger(i, logical_date=tick if i == 0 else None) for i in range(len(clients))]
    barrier = threading.Barrier(len(clients) + 1)
    t0 = 0.0

    def one(t: Trigger, api: AirflowApi) -> None:
        barrier.wait()
        t.sent_s = time.monotonic() - t0
        try:
            run = api.post(
                f"/dags/{FLEET_DAG_ID}/dagRuns", {"logical_date": t.logical_date, "conf": CONF}
            )
            t.run_id = str(run["dag_run_id"])
        except Exception as exc:  # any failure of a trigger is the finding
            t.error = f"{type(exc).__name__}: {exc}"
        t.answered_s = time.monotonic() - t0

    threads = [
        threading.Thread(target=one, args=(t, api), daemon=True)
        for t, api in zip(triggers, clients, strict=True)
    ]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    barrier.wait()
    for th in threads:
        th.join()
    return triggers


def list_runs(api: AirflowApi) -> dict[str, dict[str, Any]]:
    return {r["dag_run_id"]: r for r in api.pages(f"/dags/{FLEET_DAG_ID}/dagRuns", "dag_runs")}


def task_states(api: AirflowApi, run_id: str) -> dict[str, str]:
    tis = api.get(f"/dags/{FLEET_DAG_ID}/dagRuns/{run_id}/taskInstances", {"limit": 500})
    return {ti_key(ti): ti.get("state") or "none" for ti in tis["task_instances"]}


API_ERRORS = (AirflowApiError, httpx.HTTPError)


def retry(
    what: str,
    fn: Callable[[], Any],
    deadline: float,
    say: Callable[[str], None],
    alive: Callable[[], bool],
) -> Any:
    """``fn()`` again every POLL_S after an API error, until it works, the deadline passes or
    Airflow is gone; then the last error is raised. Each error is reported."""
    while True:
        try:
            return fn()
        except API_ERRORS as exc:
            say(f"  {what}: {type(exc).__name__}: {str(exc)[:300]}")
            if time.monotonic() > deadline or not alive():
                raise
        time.sleep(POLL_S)


def follow(
    api: AirflowApi,
    ours: Iterable[str],
    deadline: float,
    say: Callable[[str], None],
    alive: Callable[[], bool],
) -> dict[str, dict[str, Any]]:
    """Poll the run list until every run of ``ours`` is finished, the deadline passes or Airflow
    is gone (an error of the API is reported and the poll repeated, up to the deadline)."""
    ours = set(ours)
    listed: dict[str, dict[str, Any]] = {}
    last = ""
    while True:
        try:
            listed = list_runs(api)
        except API_ERRORS as exc:
            say(f"  listing the runs: {type(exc).__name__}: {str(exc)[:300]}")
        states: dict[str, int] = {}
        for r in ours:
            s = listed.get(r, {}).get("state", "missing")
            states[s] = states.get(s, 0) + 1
        line = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        if line != last:
            say(f"  [{time.strftime('%H:%M:%S')}] {line}")
            last = line
        if sum(states.get(s, 0) for s in FINISHED) == len(ours) or time.monotonic() > deadline:
            return listed
        if not alive():
            say("  airflow standalone exited; the runs not finished are lost")
            return listed
        time.sleep(POLL_S)


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    from bem_tasks.fleet.embedded import Embedded, wait_for_dag
    from bem_tasks.io import atomic_write_json

    tmp = Path(tempfile.mkdtemp(prefix="bem-load-"))
    os.environ["BEM_FLEET_ARTIFACT_ROOT"] = str(tmp / "artifacts")
    emb = Embedded(
        ROOT,
        args.port or free_port(),
        airflow_home=tmp / "airflow",
        log_server_port=free_port(),
    )

    def alive() -> bool:
        return emb.running_pid() is not None

    clients: list[AirflowApi] = []
    keep = args.keep
    try:
        t_start = time.monotonic()
        emb.start(say)
        with emb.client() as api:
            wait_for_dag(api, FLEET_DAG_ID)
            ready_s = time.monotonic() - t_start
            say(f"Airflow up and bem_fleet parsed after {ready_s:.0f} s ({emb.url})")
            tick = pending_tick(api, FLEET_DAG_ID)
            # One client per thread, each with its token already fetched: the burst is the
            # N triggers alone.
            clients = [emb.api() for _ in range(args.runs)]
            for c in clients:
                c.token()
            say(f"Triggering {args.runs} runs at once with conf {CONF} (tick taken: {tick})")
            wall0 = time.monotonic()
            deadline = wall0 + args.timeout_s
            triggers = fire(clients, tick)
            burst_s = max(t.answered_s for t in triggers)
            errors = [t for t in triggers if t.error]
            say(
                f"{args.runs - len(errors)} triggers answered, {len(errors)} failed, "
                f"in {burst_s:.2f} s"
            )
            for t in errors:
                say(f"  trigger {t.index} (after {t.answered_s:.1f} s): {t.error}")
            # Unpaused after the triggers, as `make run` does: unpausing first would let the
            # scheduler start the pending tick with default params (smoke, every mission)
            # before the first trigger takes it. Retried for up to UNPAUSE_S: a paused DAG
            # starts nothing, so its runs count as lost.
            try:
                retry(
                    "unpausing bem_fleet",
                    lambda: api.patch(f"/dags/{FLEET_DAG_ID}", {"is_paused": False}),
                    min(deadline, time.monotonic() + UNPAUSE_S),
                    say,
                    alive,
                )
                say("bem_fleet unpaused")
                unpaused = True
            except API_ERRORS:
                say(f"bem_fleet could not be unpaused in {UNPAUSE_S:.0f} s; its runs are lost")
                unpaused = False
            ours = [t.run_id for t in triggers if t.run_id]
            listed = follow(api, ours, deadline if unpaused else 0.0, say, alive)
            wall_s = time.monotonic() - wall0
            states = {}
            for r in ours:
                if r in listed and alive():
                    try:
                        states[r] = task_states(api, r)
                    except API_ERRORS as exc:
                        say(f"  task instances of {r}: {type(exc).__name__}: {str(exc)[:300]}")
        records = classify(triggers, listed, states)
        summary = summarise(records)
        extra = sorted(set(listed) - set(ours))
        for line in table(records):
            say(line)
        if extra:
            say(f"Runs of bem_fleet not triggered here: {', '.join(extra)}")
        say(
            f"wall {wall_s:.1f} s from the burst to the last run's end (or the deadline); "
            f"Airflow start-up {ready_s:.0f} s before it"
        )
        say(
            f"queue (queued -> running) p50 {summary.queue_p50_s:.1f} s, p95 "
            f"{summary.queue_p95_s:.1f} s; run (running -> end) p50 "
            f"{summary.duration_p50_s:.1f} s, p95 {summary.duration_p95_s:.1f} s"
        )
        say(
            "bem_fleet has max_active_runs=1: runs are served one at a time, so a run's queue "
            "latency is mostly the runs ahead of it."
        )
        if args.json:
            atomic_write_json(
                args.json,
                {
                    "conf": CONF,
                    "summary": asdict(summary),
                    "wall_s": wall_s,
                    "startup_s": ready_s,
                    "burst_s": burst_s,
                    "extra_runs": extra,
                    "triggers": [asdict(t) for t in triggers],
                    "runs": [asdict(r) for r in records],
                },
            )
            say(f"Per-run records: {args.json}")
        keep = keep or summary.failed > 0 or summary.lost > 0
    except Exception:
        keep = True  # the standalone log is where to look
        raise
    finally:
        for c in clients:
            c.close()
        emb.stop(say)
        if keep:
            say(f"Kept {tmp} (AIRFLOW_HOME {emb.home}, log {emb.log_file})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    say(summary.last_line())
    return 0 if summary.failed == 0 and summary.lost == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs triggered at once (default 20)")
    ap.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"follow the runs this long after the burst (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary AIRFLOW_HOME (always kept when a run failed or was lost)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the per-run records here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
