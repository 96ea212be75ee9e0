"""`make run`'s REST side (bem_tasks.fleet.embedded.run_fleet) against a fake Airflow API.

No Airflow is started: ``Embedded.start`` does nothing and ``Embedded.client`` is an
``AirflowApi`` that talks to ``FakeAirflow`` through httpx.MockTransport. A fake clock replaces
``time`` in the module, so polls and the timeouts take no real time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from bem_tasks.fleet import embedded
from bem_tasks.fleet.embedded import Embedded, run_fleet
from tests.fleet.fake_airflow import fake_api

FLEET, STATS, GATES = "bem_fleet", "bem_statistical_validation", "bem_promotion_gates"
TRIGGERED_AT = "2026-03-01T10:00:00+00:00"  # the fleet run's run_after
LATER = "2026-03-01T10:30:00+00:00"

Frame = tuple[str, dict[str, str | None]]  # (run state, {"task_id[map_index]": task state})


@dataclass
class FakeRun:
    """A scripted run: each GET of the run moves it on one frame, and the last frame sticks."""

    dag_id: str
    run_id: str
    frames: list[Frame]
    # Due (its asset event queued) once this run has finished: the upstream run that emitted
    # the event, or the run that max_active_runs=1 makes it wait for.
    after: FakeRun | None = None
    lag: int = 0  # run listings after it is due that show it only as a queued event
    run_after: str = LATER
    created: bool = False
    polls: int = 0

    @property
    def finished(self) -> bool:
        return self.polls >= len(self.frames)

    @property
    def due(self) -> bool:
        return self.after is None or self.after.finished

    def frame(self) -> Frame:
        return self.frames[min(self.polls, len(self.frames)) - 1]


def _ti(key: str, state: str | None) -> dict:
    task_id, _, index = key.partition("[")
    return {
        "task_id": task_id,
        "map_index": int(index.rstrip("]")) if index else -1,
        "state": state,
        "duration": 2.0 if state in ("success", "failed") else None,
        "start_date": None,
    }


@dataclass
class FakeAirflow:
    """The part of Airflow's REST API that run_fleet uses."""

    fleet: FakeRun  # created by the trigger
    downstream: list[FakeRun] = field(default_factory=list)
    deployed: tuple[str, ...] = (FLEET, STATS, GATES)
    unpaused: list[str] = field(default_factory=list)
    confs: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def runs(self, dag_id: str) -> list[FakeRun]:
        return [r for r in [self.fleet, *self.downstream] if r.dag_id == dag_id]

    def run(self, dag_id: str, run_id: str) -> FakeRun:
        return next(r for r in self.runs(dag_id) if r.run_id == run_id and r.created)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v2")
        self.paths.append(path)
        match request.method, path.strip("/").split("/"):
            case "GET", ["dags", dag_id] if dag_id in self.deployed:
                return httpx.Response(200, json={"dag_id": dag_id, "is_paused": True})
            case "PATCH", ["dags", dag_id] if dag_id in self.deployed:
                self.unpaused.append(dag_id)
                return httpx.Response(200, json={"dag_id": dag_id, "is_paused": False})
            case "POST", ["dags", "bem_fleet", "dagRuns"]:
                self.confs.append(json.loads(request.content)["conf"])
                self.fleet.created = True
                body = {"dag_run_id": self.fleet.run_id, "run_after": self.fleet.run_after}
                return httpx.Response(200, json={**body, "state": "queued"})
            case "GET", ["dags", dag_id, "assets", "queuedEvents"]:
                queued = [r for r in self.runs(dag_id) if r.due and not r.created]
                events = [{"dag_id": dag_id, "asset_id": 1} for _ in queued]
                return httpx.Response(200, json={"queued_events": events})
            case "GET", ["dags", dag_id, "dagRuns"]:
                return httpx.Response(200, json={"dag_runs": self._list(dag_id, request)})
            case "GET", ["dags", dag_id, "dagRuns", run_id]:
                run = self.run(dag_id, run_id)
                run.polls += 1
                return httpx.Response(200, json={"dag_run_id": run_id, "state": run.frame()[0]})
            case "GET", ["dags", dag_id, "dagRuns", run_id, "taskInstances"]:
                tasks = self.run(dag_id, run_id).frame()[1]
                tis = [_ti(key, state) for key, state in tasks.items()]
                return httpx.Response(200, json={"task_instances": tis})
        return httpx.Response(404, json={"detail": f"{request.method} {path}"})

    def _list(self, dag_id: str, request: httpx.Request) -> list[dict]:
        # The scheduler's side: a due run is created once its lag is used up.
        for run in self.runs(dag_id):
            if run.due and not run.created:
                if run.lag:
                    run.lag -= 1
                else:
                    run.created = True
        since = datetime.fromisoformat(request.url.params["run_after_gte"])
        return [
            {"dag_run_id": r.run_id, "run_after": r.run_after}
            for r in sorted(self.runs(dag_id), key=lambda r: r.run_after)
            if r.created and datetime.fromisoformat(r.run_after) >= since
        ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        assert self.now < 3600, "the fake run never finished"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(embedded, "time", fake)
    return fake


def make_run(fake: FakeAirflow, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **kw):
    """run_fleet against ``fake``; returns (exit code, every line it said, whitespace-normalised)."""
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setattr(Embedded, "start", lambda self, say: None)
    monkeypatch.setattr(Embedded, "client", lambda self: fake_api(fake.handle))
    said: list[str] = []
    code = run_fleet(tmp_path, {"profile": "smoke"}, said.append, **kw)
    return code, [" ".join(line.split()) for text in said for line in text.splitlines()]


def fleet_run(*frames: Frame) -> FakeRun:
    return FakeRun(FLEET, "manual__1", list(frames), run_after=TRIGGERED_AT)


def one_task_run(dag_id: str, run_id: str, task: str, state: str = "success", **kw) -> FakeRun:
    frames: list[Frame] = [("running", {task: "running"}), (state, {task: state})]
    return FakeRun(dag_id, run_id, frames, **kw)


def published(*missions: str, failed: str | None = None) -> Frame:
    tasks: dict[str, str | None] = {"plan": "success"}
    for m in missions:
        tasks |= {f"{m}.fit[0]": "success", f"{m}.publish_results": "success"}
    if failed:
        tasks |= {f"{failed}.fit[0]": "failed", f"{failed}.publish_results": "upstream_failed"}
    return ("failed" if failed else "success", tasks)


def test_prints_a_line_per_task_state_change_follows_downstream_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    running: Frame = (
        "running",
        {"plan": "success", "mission_a.fit[0]": "running", "mission_a.publish_results": None},
    )
    fleet = fleet_run(
        (
            "running",
            {"plan": "running", "mission_a.fit[0]": None, "mission_a.publish_results": None},
        ),
        running,
        running,  # a poll where nothing changed prints nothing
        published("mission_a"),
    )
    stats = one_task_run(STATS, "asset_triggered__s1", "validate", after=fleet)
    gates = one_task_run(GATES, "asset_triggered__g1", "check_gates", after=stats)
    fake = FakeAirflow(fleet, [stats, gates])

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == 0
    assert fake.confs == [{"profile": "smoke"}]
    assert fake.unpaused == [FLEET, STATS, GATES]
    progress = [line for line in said if line.startswith("[")]
    assert progress == [
        "[bem_fleet] mission_a.fit[0] none",
        "[bem_fleet] mission_a.publish_results none",
        "[bem_fleet] plan running",
        "[bem_fleet] mission_a.fit[0] running",
        "[bem_fleet] plan success 2.0s",
        "[bem_fleet] mission_a.fit[0] success 2.0s",
        "[bem_fleet] mission_a.publish_results success 2.0s",
        "[bem_statistical_validation] validate running",
        "[bem_statistical_validation] validate success 2.0s",
        "[bem_promotion_gates] check_gates running",
        "[bem_promotion_gates] check_gates success 2.0s",
    ]
    # The summary: one table per run, one row per task (mission, task, map index, state, time).
    assert "== bem_fleet run manual__1: success" in said
    assert "mission_a fit 0 success 2.0s" in said
    assert "mission_a publish_results - success 2.0s" in said
    assert "- plan - success 2.0s" in said
    assert "== bem_statistical_validation run asset_triggered__s1: success" in said
    assert "- validate - success 2.0s" in said
    assert "== bem_promotion_gates run asset_triggered__g1: success" in said
    assert "- check_gates - success 2.0s" in said
    assert not any(line.startswith("No mission ran") for line in said)


@pytest.mark.parametrize(("last_gate", "expected_code"), [("success", 0), ("failed", 1)])
def test_follows_every_downstream_run_started_after_the_trigger(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clock: FakeClock,
    last_gate: str,
    expected_code: int,
) -> None:
    """Two missions publish: two validation runs, hence two gating runs, all followed.

    Each second run is held back (max_active_runs=1) until the first ends and then shows up a
    listing late, as a queued asset event first.
    """
    fleet = fleet_run(published("mission_a", "mission_b"))
    old = one_task_run(
        STATS,
        "asset_triggered__old",
        "validate",
        run_after="2026-02-01T00:00:00+00:00",
        created=True,
    )
    s1 = one_task_run(STATS, "asset_triggered__s1", "validate", after=fleet)
    s2 = one_task_run(STATS, "asset_triggered__s2", "validate", after=s1, lag=1)
    g1 = one_task_run(GATES, "asset_triggered__g1", "check_gates", after=s1)
    g2 = one_task_run(GATES, "asset_triggered__g2", "check_gates", last_gate, after=s2, lag=1)
    fake = FakeAirflow(fleet, [old, s1, s2, g1, g2])

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == expected_code
    assert all(run.finished for run in (fleet, s1, s2, g1, g2))
    assert [line for line in said if line.startswith("== ")] == [
        "== bem_fleet run manual__1: success",
        "== bem_statistical_validation run asset_triggered__s1: success",
        "== bem_statistical_validation run asset_triggered__s2: success",
        "== bem_promotion_gates run asset_triggered__g1: success",
        f"== bem_promotion_gates run asset_triggered__g2: {last_gate}",
    ]
    # A run from before the trigger is not this fleet run's business.
    assert old.polls == 0


def test_a_failed_task_makes_the_exit_code_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    fleet = fleet_run(published("mission_a", failed="mission_b"))
    stats = one_task_run(STATS, "asset_triggered__s1", "validate", after=fleet)
    gates = one_task_run(GATES, "asset_triggered__g1", "check_gates", after=stats)
    fake = FakeAirflow(fleet, [stats, gates])

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == 1
    assert "[bem_fleet] mission_b.fit[0] failed 2.0s" in said
    assert "mission_b fit 0 failed 2.0s" in said
    assert "mission_b publish_results - upstream_failed -" in said
    assert gates.finished  # mission_a's results still went through validation and gating
    # Missions ran (one failed): that is not the "nothing to train" case.
    assert not any(line.startswith("No mission ran") for line in said)


def test_a_fleet_whose_missions_all_failed_is_not_reported_as_nothing_to_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    fake = FakeAirflow(fleet_run(published(failed="mission_a")))

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == 1
    assert "mission_a fit 0 failed 2.0s" in said
    assert not any(line.startswith("No mission ran") for line in said)
    assert [line for line in said if line.startswith("== ")] == [
        "== bem_fleet run manual__1: failed"
    ]


def test_a_fleet_without_missions_says_nothing_was_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    fake = FakeAirflow(fleet_run(("success", {"plan": "success"})))

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == 0
    assert "No mission ran: the fleet has no enabled mission, so nothing was trained." in said
    assert [line for line in said if line.startswith("== ")] == [
        "== bem_fleet run manual__1: success"
    ]
    assert clock.now < 180  # no downstream run was expected, so none was waited for


def test_a_downstream_run_that_never_starts_counts_as_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    fake = FakeAirflow(fleet_run(published("mission_a")))  # no validation run ever appears

    code, said = make_run(fake, monkeypatch, tmp_path)

    assert code == 1
    assert "[bem_statistical_validation] no asset-triggered run appeared within 180 s" in said
    assert "== bem_statistical_validation run -: missing" in said
    assert clock.now >= 180
    # Validation never ran, so no gating run is expected or waited for.
    assert not any(line.startswith("== bem_promotion_gates") for line in said)


def test_uses_the_project_airflow_home_even_when_the_shell_sets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "someone_elses_airflow"))
    emb = Embedded(tmp_path)
    assert emb.home == tmp_path / ".airflow"
    assert emb.env()["AIRFLOW_HOME"] == str(tmp_path / ".airflow")
    assert emb.pid_file == tmp_path / ".airflow" / "standalone.pid"


def test_following_stops_at_the_overall_deadline_naming_the_unfinished_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    stuck: Frame = ("running", {"plan": "success", "mission_a.fit[0]": "running"})
    fake = FakeAirflow(fleet_run(stuck))  # the last frame sticks: the run never finishes

    with pytest.raises(TimeoutError) as err:
        make_run(fake, monkeypatch, tmp_path, timeout_s=600)

    assert "bem_fleet run manual__1 still running at the deadline" in str(err.value)
    assert "{'mission_a.fit[0]': 'running'}" in str(err.value)
    assert 600 <= clock.now <= 600 + 3  # one poll interval past the deadline at most


def test_binds_loopback_unless_bem_fleet_host_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BEM_FLEET_HOST", raising=False)
    emb = Embedded(tmp_path, port=8123)
    assert emb.env()["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert emb.url == "http://127.0.0.1:8123"
    monkeypatch.setenv("BEM_FLEET_HOST", "0.0.0.0")
    assert emb.env()["AIRFLOW__API__HOST"] == "0.0.0.0"
    assert emb.url == "http://127.0.0.1:8123"  # a wildcard bind answers on loopback too
    monkeypatch.setenv("BEM_FLEET_HOST", "10.1.2.3")
    assert emb.url == "http://10.1.2.3:8123"


def test_start_makes_the_password_file_and_the_logs_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat

    emb = Embedded(tmp_path)
    emb.home.mkdir()
    emb.log_file.write_text("an earlier run's log\n")
    os.chmod(emb.log_file, 0o644)  # as a umask of 022 leaves it
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(
        embedded.subprocess, "Popen", lambda *a, **k: type("P", (), {"pid": 4242})()
    )
    monkeypatch.setattr(Embedded, "running_pid", lambda self: None)
    emb.start(lambda _: None)

    for path in (emb.password_file, emb.log_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert emb.password_file.read_text() == ""  # standalone writes the password into it
    assert emb.log_file.read_text() == "an earlier run's log\n"  # appended to, not truncated
    env = emb.env()
    assert env["AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS"] == "0o600"
    assert env["AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS"] == "0o700"


def test_the_log_server_never_takes_the_api_port(tmp_path: Path) -> None:
    assert Embedded(tmp_path, port=8080).env()["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "8793"
    assert Embedded(tmp_path, port=8793).env()["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "8794"


def test_start_puts_the_metadata_database_in_wal_mode_for_every_later_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback-journal SQLite failed a burst of 20 REST triggers with "database is locked"."""
    import sqlite3

    emb = Embedded(tmp_path)
    emb.home.mkdir()
    with sqlite3.connect(emb.home / "airflow.db") as con:  # as `airflow db migrate` leaves it
        con.execute("CREATE TABLE dag_run (id INTEGER)")
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(
        embedded.subprocess, "Popen", lambda *a, **k: type("P", (), {"pid": 4242})()
    )
    monkeypatch.setattr(Embedded, "running_pid", lambda self: None)
    emb.start(lambda _: None)
    emb.start(lambda _: None)  # a restart sets it again: a no-op
    later = sqlite3.connect(emb.home / "airflow.db")
    assert later.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    later.close()
