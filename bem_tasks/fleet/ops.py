"""Recovery and emergency shutdown through Airflow's REST API (`bem-fleet recover`,
`bem-fleet emergency-shutdown`).

recover: the newest run that ran the mission, of `bem_fleet` or of the mission's own DAG
`bem_mission_<x>` (whichever started last; decisions D27), has its failed and upstream_failed task
instances of that mission cleared with ``POST /dags/{dag_id}/clearTaskInstances``
(``only_failed``, a dry run first to show what goes), together with the failed ones upstream
(without them the mission cannot run) and the upstream_failed ones downstream (the missions
that waited for it). The scheduler reruns them; a phase resumes from its newest checkpoint that
verifies and a complete phase is reused (bem_tasks.missions.common.train_loop, fleet.phases).

emergency-shutdown: every DAG tagged ``bem-fleet`` is paused (``PATCH /dags/{dag_id}``), so the
scheduler starts nothing more of them, then every task instance of theirs that is running or
about to run is marked failed (``PATCH .../taskInstances/{task_id}/{map_index}``); Airflow stops
a running task whose state was changed under it. Nothing is deleted: artifacts, checkpoints and
runs stay, and `recover` (after unpausing) picks up from them. Running it again finds nothing
left to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bem_tasks.fleet.api import AirflowApi
from bem_tasks.fleet.runs import FLEET_DAG_ID, mission_dag_id

FLEET_TAG = "bem-fleet"
FAILED = ("failed", "upstream_failed")
# Running, or started by the scheduler on its own later: what a shutdown has to stop. A task
# instance with no state yet is left as is (its DAG is paused, so nothing starts it).
ACTIVE = (
    "queued",
    "scheduled",
    "running",
    "restarting",
    "up_for_retry",
    "up_for_reschedule",
    "deferred",
    "awaiting_input",
)
RECENT_RUNS = 25  # runs of each DAG looked through for the newest one that ran the mission

Say = Callable[[str], None]


class NothingToDo(Exception):
    """Nothing matched what was asked (the CLI exits 2 with this message)."""


def ti_key(ti: dict[str, Any]) -> str:
    index = ti.get("map_index", -1)
    return f"{ti['task_id']}[{index}]" if index is not None and index >= 0 else ti["task_id"]


def _ti_path(ti: dict[str, Any]) -> str:
    index = ti.get("map_index")
    return (
        f"/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}"
        f"/{-1 if index is None else index}"
    )


# ----------------------------------------------------------------------------- recover


def mission_tis(dag_id: str, mission: str, tis: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task instances of ``mission`` in a run of ``dag_id``: in `bem_fleet` its task group
    (``<mission>.*``), in the mission's own DAG every task."""
    if dag_id == FLEET_DAG_ID:
        return [t for t in tis if t["task_id"].startswith(f"{mission}.")]
    return list(tis)


def took_part(dag_id: str, mission: str, tis: Iterable[dict[str, Any]]) -> bool:
    """False for a `bem_fleet` run whose ``missions`` param left the mission out: its
    ``selected`` gate ran and everything after it was skipped."""
    return any(
        t.get("state") != "skipped" and not t["task_id"].endswith(".selected")
        for t in mission_tis(dag_id, mission, tis)
    )


@dataclass(frozen=True)
class MissionRun:
    dag_id: str
    run: dict[str, Any]
    tis: list[dict[str, Any]]

    @property
    def run_id(self) -> str:
        run_id: str = self.run["dag_run_id"]
        return run_id


def _run_tis(api: AirflowApi, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return list(api.pages(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances"))


def find_mission_run(
    api: AirflowApi, mission: str, run_id: str | None = None, dag_id: str | None = None
) -> MissionRun:
    """The run to recover: ``run_id`` (of ``dag_id``, else of whichever of the two DAGs has it),
    or the newest run, by run_after, of `bem_fleet` or `bem_mission_<x>` that ran the mission."""
    own = mission_dag_id(mission)
    dags = [dag_id] if dag_id else [FLEET_DAG_ID, own]
    bad = [d for d in dags if d not in (FLEET_DAG_ID, own)]
    if bad:
        raise ValueError(f"--dag-id {bad[0]}: expected {FLEET_DAG_ID} or {own}")
    deployed = [d for d in dags if api.exists(f"/dags/{d}")]
    if not deployed:
        raise NothingToDo(f"neither of {' nor '.join(dags)} is deployed on {api.url}")
    if run_id is not None:
        found = [
            (d, api.request("GET", f"/dags/{d}/dagRuns/{run_id}", expect=(200, 404)))
            for d in deployed
        ]
        hits = [(d, resp.json()) for d, resp in found if resp.status_code == 200]
        if not hits:
            raise NothingToDo(f"no run {run_id} of {' or '.join(deployed)}")
        if len(hits) > 1:
            raise ValueError(f"run {run_id} exists in {FLEET_DAG_ID} and {own}: give --dag-id")
        d, run = hits[0]
        return MissionRun(d, run, _run_tis(api, d, run_id))
    newest: MissionRun | None = None
    for d in deployed:
        runs = api.get(f"/dags/{d}/dagRuns", {"order_by": "-run_after", "limit": RECENT_RUNS})
        for run in runs["dag_runs"]:
            if newest is not None and run["run_after"] <= newest.run["run_after"]:
                break  # older than the best found in the other DAG
            tis = _run_tis(api, d, run["dag_run_id"])
            if took_part(d, mission, tis):
                newest = MissionRun(d, run, tis)
                break
    if newest is None:
        raise NothingToDo(
            f"no run of {' or '.join(deployed)} among the newest {RECENT_RUNS} ran {mission}"
        )
    return newest


def _clear_body(target: MissionRun, task_ids: list[str], dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "dag_run_id": target.run_id,
        "task_ids": task_ids,
        "only_failed": True,  # failed and upstream_failed
        "include_upstream": True,
        "include_downstream": True,
        "reset_dag_runs": True,
    }


def _describe(tis: list[dict[str, Any]], mine: set[str], mission: str) -> list[str]:
    lines = []
    for ti in sorted(tis, key=lambda t: (t["task_id"], t.get("map_index", -1))):
        other = "" if ti["task_id"] in mine else f"   (not {mission}: up- or downstream of it)"
        lines.append(f"  {ti_key(ti):<45} {ti.get('state') or 'none'}{other}")
    return lines


def recover(
    api: AirflowApi,
    mission: str,
    *,
    run_id: str | None = None,
    dag_id: str | None = None,
    dry_run: bool = False,
    say: Say = print,
) -> list[dict[str, Any]]:
    """Clear the mission's failed task instances in its newest run (or ``run_id``); returns
    what was cleared (what would be, with ``dry_run``). NothingToDo when none failed."""
    target = find_mission_run(api, mission, run_id, dag_id)
    where = f"{target.dag_id} run {target.run_id} ({target.run.get('state')})"
    own = mission_tis(target.dag_id, mission, target.tis)
    failed = sorted({t["task_id"] for t in own if t.get("state") in FAILED})
    if not failed:
        states = sorted({t.get("state") or "none" for t in own})
        raise NothingToDo(
            f"{mission} has no failed or upstream_failed task in {where}, the newest run that "
            f"ran it (its tasks are {', '.join(states)}): nothing to recover"
            + ("" if run_id else "; --run-id picks another run")
        )
    path = f"/dags/{target.dag_id}/clearTaskInstances"
    planned = api.post(path, _clear_body(target, failed, dry_run=True))["task_instances"]
    mine = {t["task_id"] for t in own}
    say(f"{where}: {len(planned)} task instance(s) to clear:")
    for line in _describe(planned, mine, mission):
        say(line)
    if dry_run:
        say("Dry run: nothing cleared.")
        return list(planned)
    cleared = api.post(path, _clear_body(target, failed, dry_run=False))["task_instances"]
    say(
        f"Cleared {len(cleared)} task instance(s) of {target.dag_id} run {target.run_id}: they "
        "run again, each phase from its newest checkpoint (complete phases are reused)."
    )
    if {ti_key(t) for t in cleared} != {ti_key(t) for t in planned}:
        for line in _describe(cleared, mine, mission):
            say(line)
    if api.get(f"/dags/{target.dag_id}").get("is_paused"):
        say(
            f"Note: {target.dag_id} is paused (an emergency shutdown?): the cleared tasks start "
            f"once it is unpaused (UI toggle, or PATCH /api/v2/dags/{target.dag_id} "
            '{"is_paused": false}).'
        )
    return list(cleared)


# ----------------------------------------------------------------------------- shutdown


def fleet_dags(api: AirflowApi) -> list[dict[str, Any]]:
    return sorted(api.pages("/dags", "dags", {"tags": FLEET_TAG}), key=lambda d: d["dag_id"])


def active_tis(api: AirflowApi, dag_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Every task instance of these DAGs, in any run, that runs or is about to."""
    found: list[dict[str, Any]] = []
    for dag_id in dag_ids:
        path = f"/dags/{dag_id}/dagRuns/~/taskInstances"
        found += api.pages(path, "task_instances", {"state": list(ACTIVE)})
    return found


def _ti_line(ti: dict[str, Any]) -> str:
    return f"  {ti['dag_id']} {ti['dag_run_id']} {ti_key(ti):<40} {ti.get('state')}"


def emergency_shutdown(
    api: AirflowApi,
    *,
    yes: bool,
    confirm: Callable[[str], bool] | None = None,
    say: Say = print,
    rounds: int = 3,
) -> dict[str, list[str]]:
    """Pause every fleet DAG, then mark its running and queued task instances failed.

    Without ``yes`` it shows what it would do and asks ``confirm``; with no ``confirm``, or a
    no, ValueError (nothing done). Returns what it did: the ``paused`` DAGs and the ``failed``
    task instances (``dag/run/task[index]``); both empty when there was nothing left to do.
    """
    dags = fleet_dags(api)
    if not dags:
        raise NothingToDo(f"no DAG tagged {FLEET_TAG!r} on {api.url}: is this the fleet's Airflow?")
    to_pause = [d["dag_id"] for d in dags if not d.get("is_paused")]
    dag_ids = [d["dag_id"] for d in dags]
    active = active_tis(api, dag_ids)
    say(f"Fleet DAGs on {api.url}: {len(dags)} ({len(dags) - len(to_pause)} already paused)")
    say(f"To pause: {', '.join(to_pause) if to_pause else 'none'}")
    say(f"Task instances to mark failed: {len(active)}")
    for ti in active:
        say(_ti_line(ti))
    done: dict[str, list[str]] = {"paused": [], "failed": []}
    if not to_pause and not active:
        say("Nothing to do: every fleet DAG is paused and no fleet task is running or queued.")
        return done
    if not yes and not (confirm and confirm("Pause these DAGs and fail these tasks? [y/N] ")):
        raise ValueError("emergency-shutdown: nothing done (pass --yes to go ahead)")
    # Pause first, so that the scheduler starts nothing while the tasks are being failed.
    for dag_id in to_pause:
        api.patch(f"/dags/{dag_id}", {"is_paused": True})
        done["paused"].append(dag_id)
        say(f"paused {dag_id}")
    note = f"emergency-shutdown (bem-fleet) at {datetime.now(UTC).isoformat(timespec='seconds')}"
    for _ in range(rounds):
        for ti in active:
            # Read again just before: a task that has finished meanwhile keeps its state.
            now = api.request("GET", _ti_path(ti), expect=(200, 404))
            state = now.json().get("state") if now.status_code == 200 else None
            if state not in ACTIVE:
                say(f"  {ti['dag_id']} {ti['dag_run_id']} {ti_key(ti)}: now {state}, left as is")
                continue
            api.patch(_ti_path(ti), {"new_state": "failed", "note": note})
            done["failed"].append(f"{ti['dag_id']}/{ti['dag_run_id']}/{ti_key(ti)}")
            say(f"failed {ti['dag_id']} {ti['dag_run_id']} {ti_key(ti)} (was {state})")
        # A task queued between the listing and the pause: one more look.
        active = active_tis(api, dag_ids)
        if not active:
            break
    else:
        say(f"Still active after {rounds} rounds (run it again): {len(active)}")
        for ti in active:
            say(_ti_line(ti))
    say(
        f"Done: {len(done['paused'])} DAG(s) paused, {len(done['failed'])} task instance(s) "
        "marked failed; nothing deleted (artifacts and checkpoints stay for `bem-fleet recover`)."
    )
    return done
