"""The fleet on the distributed engine: CeleryExecutor, PostgreSQL, Redis, two workers.

One smoke run of `bem_fleet` under the `full` deployment profile (decisions D1): every phase goes
to its GPU class's pool and queue. The workers split the device classes between them, so where a
phase ran shows whether routing works. The machine has no GPU: the lease still locks device
indices of the class (fake devices: h100_80gb has two, rtx4090_24gb three), and torch runs on
CPU. Phases of h100_80gb hold both its devices at once, and the exclusivity check must see that
overlap, else it could not have failed. The core runs the triggerer too; the API reports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.api import AirflowApi
from bem_tasks.fleet.cluster import CeleryCluster
from bem_tasks.fleet.embedded import ti_key, trigger_fleet
from bem_tasks.fleet.lease import Hold, concurrent_holds, manifest_holds, shared_devices
from bem_tasks.fleet.runs import RunLayout
from tests.integration.conftest import ROOT, WORKERS

pytestmark = pytest.mark.integration

FLEET = "bem_fleet"
DOWNSTREAM = ("bem_statistical_validation", "bem_promotion_gates")
# One seed: mission D's pretrain (4 variants) already puts 4 phases on OVERLAP_CLASS's 2 slots.
# Two seeds were measured at 7 minutes against about 3.5 for one (docs/reliability.md, 4.).
SEEDS = [0]
# The two missions with no upstream mission: between them they route phases to every device
# class and worker, map a phase over (seed, variant), and emit the assets that start the
# statistics and gates DAGs. The other missions' tasks are selected out (skipped), which is
# checked too. This is C's and D's end-to-end run in the suite (tests/e2e runs A and B).
MISSIONS = ["mission_c", "mission_d"]
CONF = {"profile": "smoke", "seeds": SEEDS, "missions": MISSIONS}
# The GPU class whose phases must overlap (two devices, two pool slots): mission D's pretrain.
OVERLAP_CLASS = "h100_80gb"
RUN_TIMEOUT_S = 25 * 60
DOWNSTREAM_TIMEOUT_S = 5 * 60
POLL_S = 5.0
FINISHED = {"success", "failed"}


@dataclass
class Outcome:
    """What the run left behind, gathered once for every test of this module."""

    cluster: CeleryCluster
    cfg: FleetConfig  # the deployment profile: the resource layout the DAG was built with
    run: dict[str, Any]
    tis: list[dict[str, Any]]
    intervals: list[dict[str, Any]]  # every try of every task: pool, slots, start, end
    pools: dict[str, int]
    pool_samples: list[dict[str, Any]]
    downstream: dict[str, tuple[dict[str, Any], list[dict[str, Any]]] | None] = field(
        default_factory=dict
    )

    def fail(self, message: str, tis: list[dict[str, Any]] | None = None) -> str:
        """The message, then the logs of the given task instances and of every component."""
        tasks = "\n".join(_task_log_tail(self.cluster, ti) for ti in tis or [])
        return f"{message}\n\n{tasks}\n{self.cluster.log_tails(40)}"


def _task_log_tail(cluster: CeleryCluster, ti: dict[str, Any], lines: int = 40) -> str:
    """The end of a task's own log (Airflow's default layout; JSON lines shown as text)."""
    path = cluster.home / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}"
    path /= f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        path /= f"map_index={ti['map_index']}"
    path /= f"attempt={max(ti['try_number'], 1)}.log"
    if not path.exists():
        return f"----- task {ti_key(ti)}: no log at {path} -----"
    shown = []
    for line in path.read_text(errors="replace").splitlines()[-lines:]:
        try:
            rec = json.loads(line)
            line = f"{rec.get('level', '')}: {rec.get('event', '')} {rec.get('error_detail', '')}"
        except (ValueError, AttributeError):
            pass
        shown.append(line)
    return f"----- task {ti_key(ti)} ({path.name}) -----\n" + "\n".join(shown)


def _wait_for_dags(cluster: CeleryCluster, api: AirflowApi, timeout_s: float = 240) -> None:
    """Until the fleet and the downstream DAGs are parsed; a missing downstream DAG is left to
    its test, but the fleet DAG must be there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cluster.check_alive()
        present = [d for d in (FLEET, *DOWNSTREAM) if api.exists(f"/dags/{d}")]
        if len(present) == 1 + len(DOWNSTREAM):
            return
        # Parsed files appear together; once the fleet is in, give the rest a short while.
        if FLEET in present and deadline - time.monotonic() > 30:
            deadline = time.monotonic() + 30
        time.sleep(3)
    if not api.exists(f"/dags/{FLEET}"):
        errors = api.get("/importErrors").get("import_errors", [])
        detail = "\n".join(e.get("stack_trace", "") for e in errors)
        pytest.fail(f"{FLEET} not parsed after {timeout_s:.0f}s\n{detail}\n{cluster.log_tails()}")


def _tis(api: AirflowApi, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    body = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", {"limit": 1000})
    tis: list[dict[str, Any]] = body["task_instances"]
    return tis


def _follow(
    cluster: CeleryCluster,
    api: AirflowApi,
    dag_id: str,
    run_id: str,
    timeout_s: float,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Poll a run until it finishes, sampling pool occupancy on the way."""
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_alive()
        # A DAG file that stops parsing makes its DAG stale: its run would hang, not fail.
        errors = api.get("/importErrors")
        if errors["total_entries"]:
            detail = "\n".join(e.get("stack_trace", "") for e in errors["import_errors"])
            pytest.fail(f"DAG import errors while {dag_id} run {run_id} was running:\n{detail}")
        samples.extend(api.get("/pools")["pools"])
        run: dict[str, Any] = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in FINISHED:
            return run
        if time.monotonic() > deadline:
            states = {ti_key(t): t["state"] for t in _tis(api, dag_id, run_id)}
            pytest.fail(
                f"{dag_id} run {run_id} still {run['state']} after {timeout_s:.0f}s; "
                f"tasks: {states}\n{cluster.log_tails(40)}"
            )
        time.sleep(POLL_S)


def _downstream_run(
    cluster: CeleryCluster, api: AirflowApi, dag_id: str, after: str, timeout_s: float
) -> dict[str, Any] | None:
    """The first asset-triggered run of ``dag_id`` queued after ``after``, once it appears."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cluster.check_alive()
        runs = api.get(
            f"/dags/{dag_id}/dagRuns",
            {"order_by": "run_after", "run_after_gte": after, "limit": 10},
        )["dag_runs"]
        for run in runs:
            if run["run_type"] == "asset_triggered":
                return dict(run)
        time.sleep(POLL_S)
    return None


def _trigger_paused(api: AirflowApi) -> str:
    run_id: str = trigger_fleet(api, FLEET, CONF)["dag_run_id"]
    return run_id


def _intervals(api: AirflowApi, tis: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Start/end of every try; the task-instance list shows only the latest one."""
    out = []
    for ti in tis:
        tries = [ti]
        if ti["try_number"] > 1:
            path = f"/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/{ti['task_id']}"
            path += f"/{ti['map_index']}/tries" if ti["map_index"] >= 0 else "/tries"
            tries = api.get(path)["task_instances"]
        for t in tries:
            if t.get("start_date"):
                out.append(
                    {
                        "key": f"{ti_key(t)}#{t['try_number']}",
                        "pool": t["pool"],
                        "slots": t["pool_slots"],
                        "start": t["start_date"],
                        "end": t.get("end_date"),
                    }
                )
    return out


@pytest.fixture(scope="module")
def outcome(celery_cluster: CeleryCluster) -> Outcome:
    cluster = celery_cluster
    cfg = load_fleet(ROOT / "configs" / "bem_fleet_architecture.yml", "full")
    samples: list[dict[str, Any]] = []
    with cluster.client() as api:
        _wait_for_dags(cluster, api)
        run_id = _trigger_paused(api)
        for dag_id in (FLEET, *DOWNSTREAM):
            if api.exists(f"/dags/{dag_id}"):
                api.patch(f"/dags/{dag_id}", {"is_paused": False})
        run = _follow(cluster, api, FLEET, run_id, RUN_TIMEOUT_S, samples)
        tis = _tis(api, FLEET, run_id)
        intervals = _intervals(api, tis)

        # The missions' assets schedule the statistics DAG, and its asset the gates DAG.
        downstream: dict[str, tuple[dict[str, Any], list[dict[str, Any]]] | None] = {}
        after = run["start_date"]
        for dag_id in DOWNSTREAM:
            found = None
            if run["state"] == "success" and api.exists(f"/dags/{dag_id}"):
                found = _downstream_run(cluster, api, dag_id, after, DOWNSTREAM_TIMEOUT_S)
            if found is None:
                downstream[dag_id] = None
                continue
            done = _follow(cluster, api, dag_id, found["dag_run_id"], DOWNSTREAM_TIMEOUT_S, samples)
            d_tis = _tis(api, dag_id, found["dag_run_id"])
            downstream[dag_id] = (done, d_tis)
            intervals += _intervals(api, d_tis)
            after = done["start_date"]
        pools = {p["name"]: p["slots"] for p in api.get("/pools")["pools"]}
    return Outcome(cluster, cfg, run, tis, intervals, pools, samples, downstream)


def _phases(cfg: FleetConfig) -> list[tuple[str, str, bool]]:
    """(mission, phase, per_seed) of every mission the run selected, in DAG order."""
    return [
        (mission, phase, spec.per_seed)
        for mission in cfg.topological_missions(MISSIONS)
        for phase, spec in cfg.experiments[mission].phases.items()
    ]


def _units(cfg: FleetConfig) -> list[tuple[str, str, int | None, str | None, int]]:
    """(mission, phase, seed, variant, map_index) of every phase task instance: a per-seed
    phase is mapped over the seeds, a phase with variants over (seed, variant), Airflow's
    cross product with the variants varying fastest."""
    units = []
    for mission, phase, per_seed in _phases(cfg):
        variants = cfg.experiments[mission].phases[phase].variants or [None]
        if not per_seed:
            units.append((mission, phase, None, None, -1))
            continue
        for i, seed in enumerate(SEEDS):
            for j, variant in enumerate(variants):
                units.append((mission, phase, seed, variant, i * len(variants) + j))
    return units


# ----------------------------------------------------------------------------- tests


def _selected(ti: dict[str, Any]) -> bool:
    return ti["task_id"] == "plan" or ti["task_id"].partition(".")[0] in MISSIONS


def _expected_states(ti: dict[str, Any]) -> set[str]:
    mission = ti["task_id"].partition(".")[0]
    if _selected(ti):
        return {"success"}
    # an unselected mission's gate returns False (success) and skips the rest; a gate behind
    # an unselected upstream mission is skipped itself
    return {"success", "skipped"} if ti["task_id"] == f"{mission}.selected" else {"skipped"}


def test_every_task_succeeded(outcome: Outcome) -> None:
    bad = [t for t in outcome.tis if t["state"] not in _expected_states(t)]
    not_ok = {ti_key(t): t["state"] for t in bad}
    assert outcome.run["state"] == "success" and not not_ok, outcome.fail(
        f"{FLEET} run {outcome.run['dag_run_id']} is {outcome.run['state']}; tasks not "
        f"successful: {not_ok}",
        [t for t in bad if t["state"] == "failed"],
    )
    missions = outcome.cfg.topological_missions(MISSIONS)
    expected = {"plan"} | {f"{m}.{p}" for m, p, _ in _phases(outcome.cfg)}
    expected |= {f"{m}.{t}" for m in missions for t in ("selected", "publish_results")}
    assert {t["task_id"] for t in outcome.tis if _selected(t)} == expected
    skipped_missions = {t["task_id"].partition(".")[0] for t in outcome.tis if not _selected(t)}
    assert skipped_missions == set(outcome.cfg.enabled_missions) - set(MISSIONS)


def test_each_phase_ran_on_a_worker_of_its_class(outcome: Outcome) -> None:
    cfg = outcome.cfg
    assert cfg.enabled_missions, outcome.fail(
        "no mission is enabled in configs/bem_fleet_architecture.yml: no phase to route"
    )
    layout = RunLayout(Path(outcome.cluster.artifact_root or ""), FLEET, outcome.run["dag_run_id"])
    by_key = {(t["task_id"], t["map_index"]): t for t in outcome.tis}
    workers_used: set[tuple[str, ...]] = set()
    for mission, phase, seed, variant, map_index in _units(cfg):
        spec = cfg.experiments[mission].phases[phase]
        device_class = spec.device_class
        ti = by_key[(f"{mission}.{phase}", map_index)]
        where = f"{mission}.{phase} seed={seed} variant={variant}"
        assert ti["queue"] == device_class, f"{where}: queued on {ti['queue']}"
        assert ti["pool"] == device_class, f"{where}: in pool {ti['pool']}"
        gpus = spec.gpus if cfg.arch.device_classes[device_class].kind == "gpu" else 1
        assert ti["pool_slots"] == gpus, f"{where}: pool_slots {ti['pool_slots']} != {gpus}"

        manifest = json.loads(
            (layout.phase_dir(mission, phase, seed, variant) / "manifest.json").read_text()
        )
        assert manifest.get("variant") == variant, f"{where}: manifest {manifest.get('variant')}"
        queues = tuple(q for q in manifest["worker"]["queues"].split(",") if q)
        assert device_class in queues, f"{where}: ran on a worker serving {queues}"
        workers_used.add(queues)
        lease = manifest["lease"]
        assert lease["device_class"] == device_class, f"{where}: leased {lease}"
        n_devices = cfg.arch.device_classes[device_class].devices
        if cfg.arch.device_classes[device_class].kind == "gpu":
            assert len(lease["indices"]) == spec.gpus, f"{where}: leased {lease}"
            assert all(0 <= i < n_devices for i in lease["indices"]), f"{where}: {lease}"
    assert workers_used == {w.queues for w in WORKERS}, (
        f"each worker must run at least one phase; phases ran on workers serving {workers_used}"
    )


def test_no_gpu_was_held_by_two_phases_at_once(outcome: Outcome) -> None:
    """Pools cap the count per class; the lease must also keep each device to one phase.

    The check is live only if phases of one class really held devices at once: mission D's
    `pretrain` is 4 tasks (seed x variant), all ready when D's `prepare` ends, on OVERLAP_CLASS,
    whose 2 devices, 2 pool slots and 2-slot worker run two together for tens of seconds each;
    that overlap is asserted, not assumed. tests/fleet/test_gpu_exclusivity.py shows that the
    same check (shared_devices) fails when the lease is bypassed."""
    cfg = outcome.cfg
    assert cfg.arch.device_classes[OVERLAP_CLASS].devices == 2
    assert outcome.pools[OVERLAP_CLASS] == 2, outcome.pools
    layout = RunLayout(Path(outcome.cluster.artifact_root or ""), FLEET, outcome.run["dag_run_id"])
    holds: list[Hold] = []
    for mission, phase, seed, variant, _ in _units(cfg):
        manifest = json.loads(
            (layout.phase_dir(mission, phase, seed, variant) / "manifest.json").read_text()
        )
        holds += manifest_holds(manifest, f"{mission}.{phase} seed={seed} variant={variant}")
    assert holds, outcome.fail("no phase leased a GPU: nothing to check")
    shared = shared_devices(holds)
    assert not shared, "\n".join(
        f"{a.device_class}[{a.index}]: {a.holder} held it {a.start}..{a.end}, "
        f"{b.holder} {b.start}..{b.end}"
        for a, b in shared
    )
    overlapping = [p for p in concurrent_holds(holds) if p[0].device_class == OVERLAP_CLASS]
    assert overlapping, outcome.fail(
        f"no two phases of {OVERLAP_CLASS} held its devices at the same time, so the check "
        f"above could not have failed: {[h for h in holds if h.device_class == OVERLAP_CLASS]}"
    )


def test_the_triggerer_runs_and_the_api_reports_it_healthy(outcome: Outcome) -> None:
    """The cluster runs the triggerer (deferrable operators and asset watchers need it); the
    api-server's health endpoint reports its heartbeat."""
    triggerer = [c for c in outcome.cluster.components if c.name == "triggerer"]
    assert len(triggerer) == 1 and triggerer[0].exit_code is None, outcome.fail(
        "the triggerer is not running"
    )
    assert outcome.cluster.health().get("triggerer") == "healthy", outcome.cluster.health()


def test_orchestration_tasks_ran_on_the_cpu_class(outcome: Outcome) -> None:
    """Everything but the phases (plan, gating, publishing, statistics) runs on the CPU class."""
    phase_ids = {f"{m}.{p}" for m, p, _ in _phases(outcome.cfg)}
    cpu = outcome.cfg.orchestration_class
    downstream = [ti for found in outcome.downstream.values() if found for ti in found[1]]
    ran = [ti for ti in outcome.tis if ti["state"] == "success"]
    others = [ti for ti in ran + downstream if ti["task_id"] not in phase_ids]
    assert others
    for ti in others:
        where = f"{ti['dag_id']}.{ti['task_id']}"
        assert ti["queue"] == cpu, f"{where}: queued on {ti['queue']}, not {cpu}"
        assert ti["pool"] == cpu, f"{where}: in pool {ti['pool']}, not {cpu}"


def test_pools_were_never_oversubscribed(outcome: Outcome) -> None:
    assert outcome.intervals, outcome.fail("no task ever started")
    for sample in outcome.pool_samples:
        assert sample["running_slots"] <= sample["slots"], f"pool over its slots: {sample}"
    # Replay every try's start and end: at each start, the slots in use must fit the pool.
    events: list[tuple[datetime, int, str, int, str]] = []
    for iv in outcome.intervals:
        start = datetime.fromisoformat(iv["start"])
        end = (
            datetime.fromisoformat(iv["end"])
            if iv["end"]
            else datetime.max.replace(tzinfo=start.tzinfo)
        )
        events.append((start, 1, iv["pool"], iv["slots"], iv["key"]))
        events.append((end, 0, iv["pool"], -iv["slots"], iv["key"]))  # ends sort before starts
    in_use: dict[str, int] = {}
    running: dict[str, set[str]] = {}
    for _, is_start, pool, delta, key in sorted(events):
        in_use[pool] = in_use.get(pool, 0) + delta
        keys = running.setdefault(pool, set())
        if is_start:
            keys.add(key)
        else:
            keys.discard(key)
        assert in_use[pool] <= outcome.pools[pool], (
            f"pool {pool} ({outcome.pools[pool]} slots) had {in_use[pool]} in use: {running[pool]}"
        )


def test_downstream_dags_ran_from_the_assets(outcome: Outcome) -> None:
    for dag_id in DOWNSTREAM:
        found = outcome.downstream.get(dag_id)
        assert found is not None, outcome.fail(
            f"{dag_id}: no asset-triggered run after {FLEET} run {outcome.run['dag_run_id']} "
            f"({'the fleet run did not succeed' if outcome.run['state'] != 'success' else 'none appeared'})"
        )
        run, tis = found
        bad = [t for t in tis if t["state"] != "success"]
        not_ok = {ti_key(t): t["state"] for t in bad}
        assert run["state"] == "success" and not not_ok, outcome.fail(
            f"{dag_id} run {run['dag_run_id']} is {run['state']}; tasks not successful: {not_ok}",
            [t for t in bad if t["state"] == "failed"],
        )


def test_recover_reruns_a_failed_task_and_shutdown_pauses_the_fleet(
    outcome: Outcome, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bem-fleet recover` and `emergency-shutdown --yes` against the live cluster's API (--url,
    credentials from the environment, as on a deployment). Last in the module: it changes the
    cluster. A task of the finished run is marked failed; recover clears it and the scheduler
    reruns it (a complete phase: reused, so quick); the shutdown pauses every fleet DAG, and a
    second one finds nothing left to do."""
    from bem_tasks import cli

    cluster, run_id = outcome.cluster, outcome.run["dag_run_id"]
    # mission_c's last phase (mapped over the one seed): only its publish task comes after it
    task = "mission_c.knob_sweep"
    ti_path = f"/dags/{FLEET}/dagRuns/{run_id}/taskInstances/{task}/0"
    monkeypatch.setenv("BEM_FLEET_ADMIN_USERNAME", cluster.admin_user)
    monkeypatch.setenv("BEM_FLEET_ADMIN_PASSWORD", cluster.secrets.admin_password)
    with cluster.client() as api:
        before = api.get(ti_path)
        assert before["state"] == "success", before
        api.patch(ti_path, {"new_state": "failed"})
        capsys.readouterr()

        assert cli.main(["recover", "--mission", "mission_c", "--url", cluster.url]) == 0
        out = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
        assert out[0].startswith(f"{FLEET} run {run_id} (") and out[0].endswith(
            ": 1 task instance(s) to clear:"
        ), out
        assert out[1] == f"{task}[0] failed", out
        assert out[2].startswith(f"Cleared 1 task instance(s) of {FLEET} run {run_id}"), out

        deadline = time.monotonic() + 180
        while (ti := api.get(ti_path))["state"] != "success":
            cluster.check_alive()
            assert ti["state"] != "failed" and time.monotonic() < deadline, outcome.fail(
                f"{task} after recover: {ti['state']} (try {ti['try_number']})", [ti]
            )
            time.sleep(2)
        assert ti["try_number"] > before["try_number"]
        run = api.get(f"/dags/{FLEET}/dagRuns/{run_id}")
        while run["state"] not in FINISHED and time.monotonic() < deadline:
            time.sleep(2)
            run = api.get(f"/dags/{FLEET}/dagRuns/{run_id}")
        assert run["state"] == "success", run

        assert cli.main(["emergency-shutdown", "--yes", "--url", cluster.url]) == 0
        dags = list(api.pages("/dags", "dags", {"tags": "bem-fleet"}))
        assert {FLEET, *DOWNSTREAM} <= {d["dag_id"] for d in dags}
        assert all(d["is_paused"] for d in dags), [d["dag_id"] for d in dags if not d["is_paused"]]
        capsys.readouterr()
        assert cli.main(["emergency-shutdown", "--yes", "--url", cluster.url]) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        assert last == (
            "Nothing to do: every fleet DAG is paused and no fleet task is running or queued."
        )
