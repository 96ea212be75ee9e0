"""The dashboard plugin: refuses callers without an Airflow token, shows runs from artifacts."""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

from fastapi.testclient import TestClient

from bem_tasks.fleet.runs import write_manifest
from bem_tasks.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]


def load_plugin():
    spec = importlib.util.spec_from_file_location(
        "bem_fleet_dashboard", ROOT / "plugins" / "bem_fleet_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requires_an_airflow_token(tmp_path: Path, monkeypatch) -> None:
    from airflow.api_fastapi.app import init_auth_manager

    init_auth_manager()  # what the api-server does before mounting plugins
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    client = TestClient(load_plugin().app)
    assert client.get("/").status_code == 401
    assert client.get(
        "/api/overview", headers={"Authorization": "Bearer not-a-jwt"}
    ).status_code in (401, 403)


def test_publishes_no_openapi_schema_or_docs_pages(tmp_path: Path, monkeypatch) -> None:
    # They answered without a token (FastAPI serves them outside the app's dependencies).
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    client = TestClient(load_plugin().app)
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path


def test_shows_phases_from_the_artifacts(tmp_path: Path, monkeypatch) -> None:
    phase = tmp_path / "bem_fleet" / "run1" / "mission_a" / "evaluate" / "seed_0"
    atomic_write_json(phase / "metrics.json", {"router_em": 42.0})
    write_manifest(
        phase,
        config_hash="h",
        seed=0,
        extra={"mission": "mission_a", "phase": "evaluate", "duration_s": 1.5},
    )
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    plugin = load_plugin()
    plugin.app.dependency_overrides[plugin.can_read_fleet] = lambda: None
    client = TestClient(plugin.app)
    data = client.get("/api/overview").json()
    (run,) = data["runs"]
    assert run["run_id"] == "run1"
    assert run["phases"][0]["headline"] == "router_em=42"
    page = client.get("/").text
    assert "mission_a" in page and "router_em=42" in page
    assert plugin.BemFleetPlugin.fastapi_apps[0]["url_prefix"] == "/bem-fleet"


def test_headline_prefers_the_keys_a_phase_names() -> None:
    from bem_tasks.fleet.summary import headline

    metrics = {"a": 1, "b": 2.5, "c": 3, "headline": ["c", "a"]}
    assert headline(metrics) == "c=3 a=1"
    assert headline({"a": 1, "b": 2.5, "flag": True, "name": "x"}) == "a=1 b=2.5"


def test_promotion_decisions_are_shown_gate_by_gate(tmp_path: Path, monkeypatch) -> None:
    from bem_tasks.gates import Decision, GateOutcome

    gate = GateOutcome(
        gate="latency_p50", kind="non_inferiority", metric="latency_ms", slice="slice_b",
        family="system", op="<=", threshold=0.15, relative=True, statistic="p50",
        status="failed", reason="CI lies above the margin", observed=0.24, ci_low=0.19,
        ci_high=0.28, p_adjusted=0.5, n=200,
    )  # fmt: skip
    decision = Decision(
        mission="mission_a", decision="REJECTED", summary="1 gate failed", candidate="router",
        baseline="baseline", alpha=0.05, power=0.8, gates=[gate],
    )  # fmt: skip
    report = tmp_path / "bem_promotion_gates" / "run9" / "promotion_report.json"
    atomic_write_json(report, {"decisions": [decision.to_json()]})
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    plugin = load_plugin()
    plugin.app.dependency_overrides[plugin.can_read_fleet] = lambda: None
    client = TestClient(plugin.app)
    page = client.get("/").text
    assert "<span class='REJECTED'>REJECTED</span>" in page
    row = "<td>latency_p50</td><td>latency_ms (p50)</td><td>slice_b</td><td>+24.0%</td>"
    assert row + "<td>[+19.0%, +28.0%]</td><td>&lt;= +15.0%</td><td>0.5</td>" in page
    assert "<td>failed</td>" in page and "CI lies above the margin" in page
    assert "<meta http-equiv='refresh' content='30'>" in page
    assert "http-equiv" not in client.get("/?refresh=0").text
    assert client.get("/?refresh=-1").status_code == 422
    broken = Decision(
        mission="mission_c", decision="ERROR", summary="statistics failed", alpha=0.05,
        power=0.8, gates=[], error="ValueError: unpaired records for 'violation'",
    )  # fmt: skip
    atomic_write_json(report, {"decisions": [broken.to_json()]})
    page = client.get("/").text
    assert "<span class='ERROR'>ERROR</span>" in page
    assert "<p class='ERROR'>ValueError: unpaired records for &#x27;violation&#x27;</p>" in page


def test_mission_page_shows_curves_forest_plot_and_trends(tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plt.plot([0, 1], [1, 0])
        plt.savefig(path)
        plt.close()

    png(tmp_path / "bem_fleet/run1/mission_a/train_experts/seed_0/loss.png")
    png(tmp_path / "bem_promotion_gates/g1/forest_mission_a.png")
    gate = {"gate": "em_gain", "threshold": 1.5, "status": "failed", "observed": 0.5,
            "ci_low": -0.5, "ci_high": 1.5, "relative": False}  # fmt: skip
    for run in ("g1", "g2"):
        atomic_write_json(
            tmp_path / f"bem_promotion_gates/{run}/promotion_report.json",
            {"decisions": [{"mission": "mission_a", "decision": "REJECTED", "gates": [gate]}]},
        )
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    plugin = load_plugin()
    plugin.app.dependency_overrides[plugin.can_read_fleet] = lambda: None
    client = TestClient(plugin.app)
    page = client.get("/mission/mission_a")
    assert page.status_code == 200
    text = page.text
    curve = "bem_fleet/run1/mission_a/train_experts/seed_0/loss.png"
    assert f"<img src='../file/{curve}'" in text
    assert "<img src='../file/bem_promotion_gates/g1/forest_mission_a.png'" in text
    assert "<img src='mission_a/trend.png'" in text and text.count("<td>em_gain</td>") == 2
    for url in (f"/file/{curve}", "/mission/mission_a/trend.png"):
        image = client.get(url)
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG", url
    (tmp_path / "secret.txt").write_text("x")
    assert client.get("/file/secret.txt").status_code == 404
    assert client.get("/file/..%2F..%2Fetc%2Fpasswd.png").status_code == 404
    assert client.get("/mission/mission_zz").status_code == 404
    assert client.get("/mission/mission_b").status_code == 200  # nothing yet: still a page
    assert client.get("/mission/mission_b/trend.png").status_code == 404


def _phase(root: Path, run: str, mission: str, phase: str, seed: int, metrics: dict) -> Path:
    d = root / "bem_fleet" / run / mission / phase / f"seed_{seed}"
    atomic_write_json(d / "metrics.json", metrics)
    write_manifest(
        d, config_hash="h", seed=seed, extra={"mission": mission, "phase": phase, "duration_s": 2}
    )
    return d


def _client(tmp_path: Path, monkeypatch) -> TestClient:
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path))
    plugin = load_plugin()
    plugin.app.dependency_overrides[plugin.can_read_fleet] = lambda: None
    return TestClient(plugin.app)


def test_bad_artifacts_are_errors_on_their_rows_and_the_page_still_answers(
    tmp_path: Path, monkeypatch
) -> None:
    _phase(tmp_path, "good", "mission_a", "evaluate", 0, {"router_em": 42.0})
    corrupt = _phase(tmp_path, "bad", "mission_a", "evaluate", 0, {"router_em": 1.0})
    (corrupt / "manifest.json").write_text('{"status": "complete",\n "files": ')
    as_string = _phase(tmp_path, "bad", "mission_a", "evaluate", 1, {"router_em": "42.0"})
    headline = _phase(
        tmp_path, "bad", "mission_b", "online", 0, {"acc": "high", "headline": ["acc"]}
    )
    wrong_duration = _phase(tmp_path, "bad", "mission_c", "prepare", 0, {"n": 1})
    manifest = json.loads((wrong_duration / "manifest.json").read_text())
    atomic_write_json(wrong_duration / "manifest.json", {**manifest, "duration_s": "2s"})
    listed = _phase(tmp_path, "bad", "mission_d", "prepare", 0, {"n": 1})
    atomic_write_json(listed / "metrics.json", [1, 2])
    report = tmp_path / "bem_fleet" / "bad" / "promotion_report.json"
    atomic_write_json(report, {"decisions": [{"mission": "mission_a", "gates": "em_gain"}]})

    client = _client(tmp_path, monkeypatch)
    page = client.get("/")
    assert page.status_code == 200
    api = client.get("/api/overview")
    assert api.status_code == 200
    runs = {r["run_id"]: r for r in api.json()["runs"]}
    assert runs["good"]["errors"] == []
    assert runs["good"]["phases"][0]["headline"] == "router_em=42"
    bad = runs["bad"]
    rows = {(p["mission"], p["seed"]): p for p in bad["phases"]}
    assert {p["status"] for p in bad["phases"]} == {"ERROR"}
    expected = {
        ("mission_a", 0): f"{corrupt / 'manifest.json'}:2: not valid JSON (Expecting value)",
        ("mission_a", 1): f"{as_string / 'metrics.json'}:router_em: expected a number, got "
        "the string '42.0'",
        ("mission_b", 0): f"{headline / 'metrics.json'}:acc: a headline metric must be a "
        "number, got 'high' (a string)",
        ("mission_c", 0): f"{wrong_duration / 'manifest.json'}:duration_s: expected a number "
        "of seconds, got '2s' (a string)",
        ("mission_d", 0): f"{listed / 'metrics.json'}: expected a JSON object of metrics, got "
        "a list",
    }
    assert {k: r["headline"] for k, r in rows.items()} == expected
    assert rows[("mission_a", 0)]["phase"] == "evaluate"  # where it is, from the folder
    report_error = f"{report}:decisions[0]: expected an object with a list of gates"
    assert bad["errors"] == [*expected.values(), report_error]

    for message in [*expected.values(), report_error]:
        assert html.escape(message) in page.text
    # a row's error is on its row, not repeated above the table; the report's is a paragraph
    assert page.text.count(html.escape(expected[("mission_a", 1)])) == 1
    assert f"<p class='ERROR'>{html.escape(report_error)}</p>" in page.text
    assert "router_em=42" in page.text  # the good run is shown as usual

    # a gates report that is not JSON: the mission page still answers and names it
    gates = tmp_path / "bem_promotion_gates" / "g1" / "promotion_report.json"
    gates.parent.mkdir(parents=True)
    gates.write_text("{")
    mission = client.get("/mission/mission_a")
    assert mission.status_code == 200 and str(gates) in mission.text
    assert client.get("/").status_code == 200


def test_a_refresh_reads_only_the_files_that_changed(tmp_path: Path, monkeypatch) -> None:
    import os

    from bem_tasks.fleet import dashboard
    from bem_tasks.fleet.summary import read_json_file

    reads: list[Path] = []

    def counting(path: Path):
        reads.append(path)
        return read_json_file(path)

    monkeypatch.setattr(dashboard, "ARTIFACTS", dashboard.ArtifactCache(reader=counting))
    a = _phase(tmp_path, "r1", "mission_a", "evaluate", 0, {"em": 1.0})
    b = _phase(tmp_path, "r2", "mission_a", "evaluate", 0, {"em": 2.0})
    (b / "metrics.json").write_text("{oops")
    gates = tmp_path / "bem_promotion_gates" / "g1" / "promotion_report.json"
    atomic_write_json(gates, {"decisions": []})
    client = _client(tmp_path, monkeypatch)

    assert client.get("/").status_code == 200
    first = sorted(reads)
    all_files = sorted(
        [a / "manifest.json", a / "metrics.json", b / "manifest.json", b / "metrics.json", gates]
    )
    assert first == all_files  # each file once, the corrupt one included
    reads.clear()
    assert client.get("/").status_code == 200 and client.get("/api/overview").status_code == 200
    assert reads == []  # nothing changed: nothing read, not even the corrupt file

    stat = (a / "metrics.json").stat()
    os.utime(a / "metrics.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert "em=1" in client.get("/").text
    assert reads == [a / "metrics.json"]  # touched: only it is read again
    reads.clear()
    # rewritten atomically to the same size within the same mtime: a new inode, so re-read
    atomic_write_json(a / "metrics.json", {"em": 7.0})
    os.utime(a / "metrics.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert "em=7" in client.get("/").text
    assert reads == [a / "metrics.json"]
    reads.clear()
    atomic_write_json(b / "metrics.json", {"em": 2.0})  # the corrupt file fixed
    page = client.get("/").text
    assert reads == [b / "metrics.json"] and "em=2" in page and "not valid JSON" not in page


def test_runs_are_shown_by_their_run_id_not_their_folder_name(tmp_path: Path, monkeypatch) -> None:
    from bem_tasks.fleet.runs import RunLayout

    layout = RunLayout(tmp_path, "bem_fleet", "manual__2026-01-01T00:00:00+00:00")
    phase = layout.phase_dir("mission_a", "evaluate", 0)
    atomic_write_json(phase / "metrics.json", {"em": 1.0})
    write_manifest(phase, config_hash="h", seed=0, extra={"mission": "mission_a"})
    assert layout.run_dir.name == "manual__2026-01-01T00~3a00~3a00~2b00~3a00"
    client = _client(tmp_path, monkeypatch)
    (run,) = client.get("/api/overview").json()["runs"]
    assert run["run_id"] == "manual__2026-01-01T00:00:00+00:00"
    assert "<h2>bem_fleet / manual__2026-01-01T00:00:00+00:00</h2>" in client.get("/").text
