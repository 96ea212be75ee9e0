"""`bem-fleet recover` and `bem-fleet emergency-shutdown` against a fake Airflow API.

``FakeAirflow`` keeps DAGs, runs and task instances and answers the requests the commands make
(httpx.MockTransport); clearTaskInstances follows Airflow 3.3's rules (the given tasks, their
relatives up and downstream when asked, only the failed and upstream_failed ones). The live
counterpart is in tests/integration/test_celery_fleet.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from bem_tasks import cli
from bem_tasks.fleet.ops import ACTIVE, NothingToDo, emergency_shutdown, recover
from tests.fleet.fake_airflow import fake_api

TI = dict  # {"task_id", "map_index", "state", ...}


@dataclass
class FakeDag:
    dag_id: str
    upstream: dict[str, list[str]]  # task -> the tasks it waits for
    runs: dict[str, dict] = field(default_factory=dict)  # run_id -> {"run": {...}, "tis": [...]}
    is_paused: bool = False
    tags: tuple[str, ...] = ("bem-fleet",)

    def add_run(self, run_id: str, run_after: str, states: dict[str, str | None]) -> None:
        tis = []
        for key, state in states.items():
            task_id, _, index = key.partition("[")
            tis.append({
                "dag_id": self.dag_id, "dag_run_id": run_id, "task_id": task_id,
                "map_index": int(index.rstrip("]")) if index else -1, "state": state, "note": None,
            })  # fmt: skip
        state = (
            "failed" if any(t["state"] in ("failed", "upstream_failed") for t in tis) else "success"
        )
        run = {"dag_id": self.dag_id, "dag_run_id": run_id, "run_after": run_after, "state": state}
        self.runs[run_id] = {"run": run, "tis": tis}

    def relatives(self, tasks: set[str], down: bool) -> set[str]:
        edges = [(u, t) for t, ups in self.upstream.items() for u in ups]
        found, frontier = set(tasks), set(tasks)
        while frontier:
            step = {t for u, t in edges if u in frontier} if down else {
                u for u, t in edges if t in frontier
            }  # fmt: skip
            frontier = step - found
            found |= step
        return found


@dataclass
class FakeAirflow:
    dags: dict[str, FakeDag]
    requests: list[tuple[str, str, dict | None]] = field(default_factory=list)
    on_ti_read: Callable[[TI], None] | None = None
    on_ti_patch: Callable[[TI], None] | None = None

    def ti(self, dag_id: str, run_id: str, task_id: str, index: int) -> TI | None:
        tis = self.dags[dag_id].runs[run_id]["tis"]
        return next((t for t in tis if (t["task_id"], t["map_index"]) == (task_id, index)), None)

    def state(self, dag_id: str, run_id: str, key: str) -> str | None:
        task_id, _, index = key.partition("[")
        ti = self.ti(dag_id, run_id, task_id, int(index.rstrip("]")) if index else -1)
        assert ti is not None, key
        return ti["state"]

    def changes(self) -> list[tuple[str, str, dict | None]]:
        return [r for r in self.requests if r[0] != "GET" and not (r[2] or {}).get("dry_run")]

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v2")
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path, body))
        q = request.url.params
        match request.method, path.strip("/").split("/"):
            case "GET", ["dags"]:
                dags = [
                    {"dag_id": d.dag_id, "is_paused": d.is_paused, "tags": list(d.tags)}
                    for d in self.dags.values()
                    if set(q.get_list("tags")) <= set(d.tags)
                ]
                page = dags[int(q["offset"]) :][: int(q["limit"])]
                return httpx.Response(200, json={"dags": page, "total_entries": len(dags)})
            case "GET", ["dags", dag_id] if dag_id in self.dags:
                return httpx.Response(
                    200, json={"dag_id": dag_id, "is_paused": self.dags[dag_id].is_paused}
                )
            case "PATCH", ["dags", dag_id] if dag_id in self.dags:
                self.dags[dag_id].is_paused = body["is_paused"]
                return httpx.Response(200, json={"dag_id": dag_id, "is_paused": body["is_paused"]})
            case "GET", ["dags", dag_id, "dagRuns"] if dag_id in self.dags:
                assert q["order_by"] == "-run_after"
                runs = sorted(
                    (r["run"] for r in self.dags[dag_id].runs.values()),
                    key=lambda r: r["run_after"], reverse=True,
                )[: int(q["limit"])]  # fmt: skip
                return httpx.Response(200, json={"dag_runs": runs, "total_entries": len(runs)})
            case "GET", ["dags", dag_id, "dagRuns", run_id] if (
                run_id in self.dags.get(dag_id, FakeDag("", {})).runs
            ):
                return httpx.Response(200, json=self.dags[dag_id].runs[run_id]["run"])
            case "GET", ["dags", dag_id, "dagRuns", "~", "taskInstances"]:
                tis = [
                    t for r in self.dags[dag_id].runs.values() for t in r["tis"]
                    if t["state"] in q.get_list("state")
                ]  # fmt: skip
                return self._page(tis, q)
            case "GET", ["dags", dag_id, "dagRuns", run_id, "taskInstances"]:
                return self._page(self.dags[dag_id].runs[run_id]["tis"], q)
            case "GET", ["dags", dag_id, "dagRuns", run_id, "taskInstances", task_id, index]:
                ti = self.ti(dag_id, run_id, task_id, int(index))
                if ti is None:
                    return httpx.Response(404, json={"detail": "not found"})
                if self.on_ti_read:
                    self.on_ti_read(ti)
                return httpx.Response(200, json=ti)
            case "PATCH", ["dags", dag_id, "dagRuns", run_id, "taskInstances", task_id, index]:
                ti = self.ti(dag_id, run_id, task_id, int(index))
                assert ti is not None and set(body) == {"new_state", "note"}
                ti["state"], ti["note"] = body["new_state"], body["note"]
                if self.on_ti_patch:
                    self.on_ti_patch(ti)
                return httpx.Response(200, json={"task_instances": [ti], "total_entries": 1})
            case "POST", ["dags", dag_id, "clearTaskInstances"]:
                return self._clear(self.dags[dag_id], body)
        return httpx.Response(404, json={"detail": f"{request.method} {path}: not in the fake"})

    @staticmethod
    def _page(tis: list[TI], q: httpx.QueryParams) -> httpx.Response:
        page = tis[int(q["offset"]) :][: int(q["limit"])]
        return httpx.Response(200, json={"task_instances": page, "total_entries": len(tis)})

    @staticmethod
    def _clear(dag: FakeDag, body: dict) -> httpx.Response:
        assert body["only_failed"] and body["reset_dag_runs"] and body["task_ids"]
        tasks = set(body["task_ids"])
        if body["include_upstream"]:
            tasks |= dag.relatives(set(body["task_ids"]), down=False)
        if body["include_downstream"]:
            tasks |= dag.relatives(set(body["task_ids"]), down=True)
        entry = dag.runs[body["dag_run_id"]]
        hit = [t for t in entry["tis"] if t["task_id"] in tasks and t["state"] in ("failed", "upstream_failed")]  # fmt: skip
        shown = [dict(t) for t in hit]
        if not body["dry_run"]:
            for t in hit:
                t["state"] = None
            entry["run"]["state"] = "queued"
        return httpx.Response(200, json={"task_instances": shown, "total_entries": len(shown)})


def fleet_dag() -> FakeDag:
    """bem_fleet with mission_a (a mapped phase), mission_b after it, mission_c on its own."""
    up = {"mission_a.selected": ["plan"], "mission_a.prepare": ["mission_a.selected"],
          "mission_a.train": ["mission_a.prepare"], "mission_a.publish_results": ["mission_a.train"],
          "mission_b.selected": ["plan", "mission_a.publish_results"],
          "mission_b.shadow": ["mission_b.selected"], "mission_b.publish_results": ["mission_b.shadow"],
          "mission_c.selected": ["plan"], "mission_c.fit": ["mission_c.selected"],
          "mission_c.publish_results": ["mission_c.fit"]}  # fmt: skip
    return FakeDag("bem_fleet", up)


def mission_a_dag() -> FakeDag:
    up = {"prepare": ["plan"], "train": ["prepare"], "publish_results": ["train"]}
    return FakeDag("bem_mission_a", up)


A_FAILED = {
    "plan": "success", "mission_a.selected": "success", "mission_a.prepare": "success",
    "mission_a.train[0]": "success", "mission_a.train[1]": "failed",
    "mission_a.publish_results": "upstream_failed", "mission_b.selected": "upstream_failed",
    "mission_b.shadow": "upstream_failed", "mission_b.publish_results": "upstream_failed",
    "mission_c.selected": "success", "mission_c.fit": "failed",
    "mission_c.publish_results": "upstream_failed",
}  # fmt: skip
A_LEFT_OUT = {
    "plan": "success", "mission_a.selected": "success", "mission_a.prepare": "skipped",
    "mission_a.train": "skipped", "mission_a.publish_results": "skipped",
    "mission_c.selected": "success", "mission_c.fit": "success",
    "mission_c.publish_results": "success",
}  # fmt: skip


def test_recover_clears_the_missions_failures_and_what_waited_for_it() -> None:
    fleet = fleet_dag()
    fleet.add_run("manual__1", "2026-03-01T00:00:00+00:00", A_FAILED)
    fake = FakeAirflow({"bem_fleet": fleet})  # bem_mission_a is not deployed
    said: list[str] = []

    cleared = recover(fake_api(fake.handle), "mission_a", say=said.append)

    # mission_a's failed map index and its publish task, and mission_b, which waited for it;
    # not mission_c's own failure, not the successful map index
    expected = {"mission_a.train[1]", "mission_a.publish_results", "mission_b.selected",
                "mission_b.shadow", "mission_b.publish_results"}  # fmt: skip
    assert {f"{t['task_id']}[{t['map_index']}]".replace("[-1]", "") for t in cleared} == expected
    for key in expected:
        assert fake.state("bem_fleet", "manual__1", key) is None, key
    assert fake.state("bem_fleet", "manual__1", "mission_c.fit") == "failed"
    assert fake.state("bem_fleet", "manual__1", "mission_a.train[0]") == "success"
    assert fleet.runs["manual__1"]["run"]["state"] == "queued"
    # a dry run first, then the same request for real
    posts = [b for m, p, b in fake.requests if m == "POST"]
    assert [b["dry_run"] for b in posts] == [True, False]
    assert posts[0]["task_ids"] == ["mission_a.publish_results", "mission_a.train"]
    assert posts[0]["dag_run_id"] == "manual__1"
    lines = [" ".join(line.split()) for line in said]
    assert lines[0] == "bem_fleet run manual__1 (failed): 5 task instance(s) to clear:"
    assert "mission_a.train[1] failed" in lines
    assert "mission_b.shadow upstream_failed (not mission_a: up- or downstream of it)" in lines
    assert lines[-1].startswith("Cleared 5 task instance(s) of bem_fleet run manual__1")


def test_recover_takes_the_newest_run_that_ran_the_mission_of_either_dag() -> None:
    fleet, own = fleet_dag(), mission_a_dag()
    fleet.add_run("scheduled__0301", "2026-03-01T02:00:00+00:00", A_FAILED)
    own.add_run("manual__0302", "2026-03-02T09:00:00+00:00",
                {"plan": "success", "prepare": "failed", "train": "upstream_failed",
                 "publish_results": "upstream_failed"})  # fmt: skip
    # newest of all, but its `missions` param left mission_a out
    fleet.add_run("manual__0303", "2026-03-03T09:00:00+00:00", A_LEFT_OUT)
    own.is_paused = True
    fake = FakeAirflow({"bem_fleet": fleet, "bem_mission_a": own})
    said: list[str] = []

    cleared = recover(fake_api(fake.handle), "mission_a", say=said.append)

    assert sorted(t["task_id"] for t in cleared) == ["prepare", "publish_results", "train"]
    assert [p for m, p, _ in fake.requests if m == "POST"] == [
        "/dags/bem_mission_a/clearTaskInstances"
    ] * 2
    assert fake.state("bem_fleet", "scheduled__0301", "mission_a.train[1]") == "failed"
    assert said[-1].startswith("Note: bem_mission_a is paused")

    # --run-id picks the older fleet run instead (found without naming its DAG)
    recover(fake_api(fake.handle), "mission_a", run_id="scheduled__0301", say=said.append)
    assert fake.state("bem_fleet", "scheduled__0301", "mission_a.train[1]") is None


def test_recover_dry_run_clears_nothing() -> None:
    fleet = fleet_dag()
    fleet.add_run("manual__1", "2026-03-01T00:00:00+00:00", A_FAILED)
    fake = FakeAirflow({"bem_fleet": fleet})
    said: list[str] = []

    planned = recover(fake_api(fake.handle), "mission_a", dry_run=True, say=said.append)

    assert len(planned) == 5 and said[-1] == "Dry run: nothing cleared."
    assert fake.state("bem_fleet", "manual__1", "mission_a.train[1]") == "failed"
    assert [b["dry_run"] for m, _, b in fake.requests if m == "POST"] == [True]


def test_recover_says_why_when_nothing_matches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = fleet_dag()
    fleet.add_run("manual__1", "2026-03-01T00:00:00+00:00", A_FAILED)
    fleet.add_run(
        "manual__2", "2026-03-02T00:00:00+00:00", {**A_LEFT_OUT, "mission_c.fit": "failed"}
    )
    fake = FakeAirflow({"bem_fleet": fleet})
    monkeypatch.setattr(cli, "_ops_api", lambda args: fake_api(fake.handle))

    # mission_c failed in its newest run (manual__2): something to show, exit 0
    assert cli.main(["recover", "--mission", "mission_c", "--dry-run"]) == 0
    assert cli.main(["recover", "--mission", "mission_a", "--run-id", "manual__9"]) == 2
    assert "no run manual__9 of bem_fleet" in capsys.readouterr().err

    fleet.add_run("manual__3", "2026-03-03T00:00:00+00:00", {**A_FAILED, **{
        k: "success" for k in A_FAILED if k.startswith("mission_a.")}})  # fmt: skip
    assert cli.main(["recover", "--mission", "mission_a"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == (
        "recover: mission_a has no failed or upstream_failed task in bem_fleet run manual__3 "
        "(failed), the newest run that ran it (its tasks are success): nothing to recover; "
        "--run-id picks another run"
    )
    assert cli.main(["recover", "--mission", "mission_z"]) == 2
    assert "no run of bem_fleet among the newest 25 ran mission_z" in capsys.readouterr().err
    assert not fake.changes()


def test_recover_refuses_a_dag_that_is_not_the_missions() -> None:
    fake = FakeAirflow({"bem_fleet": fleet_dag()})
    with pytest.raises(
        ValueError, match="--dag-id bem_mission_b: expected bem_fleet or bem_mission_a"
    ):
        recover(fake_api(fake.handle), "mission_a", dag_id="bem_mission_b")
    with pytest.raises(NothingToDo, match="neither of bem_mission_a"):
        recover(fake_api(fake.handle), "mission_a", dag_id="bem_mission_a")


# ----------------------------------------------------------------------------- shutdown


def shutdown_fleet() -> FakeAirflow:
    fleet = fleet_dag()
    fleet.add_run("manual__1", "2026-03-01T00:00:00+00:00", {
        "plan": "success", "mission_a.selected": "success", "mission_a.prepare": "success",
        "mission_a.train[0]": "running", "mission_a.train[1]": "queued",
        "mission_a.publish_results": None, "mission_c.selected": "success",
        "mission_c.fit": "up_for_retry", "mission_c.publish_results": None,
    })  # fmt: skip
    own = mission_a_dag()
    own.add_run(
        "manual__2", "2026-03-01T01:00:00+00:00", {"plan": "success", "prepare": "deferred"}
    )
    gates = FakeDag("bem_promotion_gates", {}, is_paused=True)
    gates.add_run("asset_triggered__1", "2026-03-01T03:00:00+00:00", {"check_gates": "scheduled"})
    other = FakeDag("someone_elses_etl", {}, tags=("etl",))
    other.add_run("manual__x", "2026-03-01T00:00:00+00:00", {"load": "running"})
    return FakeAirflow({d.dag_id: d for d in (fleet, own, gates, other)})


def test_shutdown_pauses_the_fleet_and_fails_its_active_tasks_only() -> None:
    fake = shutdown_fleet()
    said: list[str] = []

    done = emergency_shutdown(fake_api(fake.handle), yes=True, say=said.append)

    assert done["paused"] == ["bem_fleet", "bem_mission_a"]  # the gates DAG already was
    assert sorted(done["failed"]) == [
        "bem_fleet/manual__1/mission_a.train[0]", "bem_fleet/manual__1/mission_a.train[1]",
        "bem_fleet/manual__1/mission_c.fit", "bem_mission_a/manual__2/prepare",
        "bem_promotion_gates/asset_triggered__1/check_gates",
    ]  # fmt: skip
    assert all(
        fake.dags[d].is_paused for d in ("bem_fleet", "bem_mission_a", "bem_promotion_gates")
    )
    # what is not the fleet's, or not active, is left alone; nothing is deleted
    assert not fake.dags["someone_elses_etl"].is_paused
    assert fake.state("someone_elses_etl", "manual__x", "load") == "running"
    assert fake.state("bem_fleet", "manual__1", "mission_a.prepare") == "success"
    assert fake.state("bem_fleet", "manual__1", "mission_a.publish_results") is None
    assert not [r for r in fake.requests if r[0] == "DELETE"]
    ti = fake.ti("bem_fleet", "manual__1", "mission_a.train", 0)
    assert ti is not None and ti["state"] == "failed"
    assert ti["note"].startswith("emergency-shutdown (bem-fleet) at ")
    # the DAGs were paused before any task was failed
    methods = [(m, p.count("/")) for m, p, _ in fake.changes()]
    assert methods[:2] == [("PATCH", 2), ("PATCH", 2)] and all(n > 2 for _, n in methods[2:])
    assert said[-1].startswith("Done: 2 DAG(s) paused, 5 task instance(s) marked failed")

    # idempotent: a second shutdown finds nothing to do and changes nothing
    fake.requests.clear()
    said.clear()
    again = emergency_shutdown(fake_api(fake.handle), yes=True, say=said.append)
    assert again == {"paused": [], "failed": []} and not fake.changes()
    assert said[-1] == (
        "Nothing to do: every fleet DAG is paused and no fleet task is running or queued."
    )


def test_shutdown_leaves_a_task_that_finished_meanwhile_and_catches_one_queued_late() -> None:
    fake = shutdown_fleet()

    def finishes(ti: TI) -> None:
        if (ti["task_id"], ti["map_index"]) == ("mission_a.train", 0):
            ti["state"] = "success"  # finished between the listing and the PATCH

    def queues_publish(ti: TI) -> None:
        late = fake.ti("bem_fleet", "manual__1", "mission_c.publish_results", -1)
        if late is not None and late["state"] is None:
            late["state"] = "queued"  # queued by the scheduler just before the pause

    fake.on_ti_read, fake.on_ti_patch = finishes, queues_publish
    done = emergency_shutdown(fake_api(fake.handle), yes=True, say=lambda s: None)

    assert fake.state("bem_fleet", "manual__1", "mission_a.train[0]") == "success"
    assert "bem_fleet/manual__1/mission_a.train[0]" not in done["failed"]
    assert "bem_fleet/manual__1/mission_c.publish_results" in done["failed"]
    assert fake.state("bem_fleet", "manual__1", "mission_c.publish_results") == "failed"


def test_shutdown_without_yes_asks_and_does_nothing_unless_told(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = shutdown_fleet()
    with pytest.raises(ValueError, match=r"nothing done \(pass --yes to go ahead\)"):
        emergency_shutdown(fake_api(fake.handle), yes=False, confirm=lambda p: False)
    assert not fake.changes()
    done = emergency_shutdown(fake_api(fake.handle), yes=False, confirm=lambda p: True)
    assert len(done["failed"]) == 5

    # the command line: not a terminal and no --yes -> exit 2, nothing done
    fake = shutdown_fleet()
    monkeypatch.setattr(cli, "_ops_api", lambda args: fake_api(fake.handle))
    assert cli.main(["emergency-shutdown"]) == 2
    assert "pass --yes" in capsys.readouterr().err and not fake.changes()
    assert cli.main(["emergency-shutdown", "--yes"]) == 0
    assert all(fake.dags[d].is_paused for d in ("bem_fleet", "bem_mission_a"))
    assert set(ACTIVE).isdisjoint(
        t["state"] for d in ("bem_fleet", "bem_mission_a") for r in fake.dags[d].runs.values() for t in r["tis"]
    )  # fmt: skip


def test_shutdown_on_a_server_without_fleet_dags_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAirflow({"etl": FakeDag("etl", {}, tags=("etl",))})
    monkeypatch.setattr(cli, "_ops_api", lambda args: fake_api(fake.handle))
    assert cli.main(["emergency-shutdown", "--yes"]) == 2
    assert "no DAG tagged 'bem-fleet' on http://airflow.test" in capsys.readouterr().err


def test_the_api_refusing_is_reported_with_its_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": "Forbidden: needs DAG edit permission"})

    monkeypatch.setattr(cli, "_ops_api", lambda args: fake_api(forbidden))
    assert cli.main(["emergency-shutdown", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "the Airflow API refused: GET http://airflow.test/api/v2/dags?" in err
    assert "HTTP 403, expected 200; response body:" in err and "needs DAG edit permission" in err


def test_the_url_option_takes_credentials_from_the_cluster_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("BEM_FLEET_ADMIN_PASSWORD", "s3cret")
    monkeypatch.setenv("BEM_FLEET_ADMIN_USERNAME", "ops")
    args = cli.build_parser().parse_args(
        ["recover", "--mission", "mission_a", "--url", "http://af:8080"]
    )
    api = cli._ops_api(args)
    assert (api.url, api.username) == ("http://af:8080", "ops")

    monkeypatch.chdir(tmp_path)  # a project root without .airflow: no embedded Airflow yet
    (tmp_path / "configs").mkdir()
    args = cli.build_parser().parse_args(["emergency-shutdown", "--port", "8099"])
    with pytest.raises(FileNotFoundError, match="simple_auth_manager_passwords.json.generated"):
        cli._ops_api(args)
