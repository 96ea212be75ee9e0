"""Validation + gating of mission results files, on hand-made per-example records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats.mstats import hdquantiles

from bem_tasks.eval.records import ExampleRecord, read_records, write_records
from bem_tasks.fleet.promotion import gate_results, validate_results
from bem_tasks.gates import load_gates
from bem_tasks.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
GATES = ROOT / "configs" / "gates_bem2.yaml"
# Mission A's gated metrics by gate name (the mission defines them; these tests feed them)
A_METRIC = {g.name: g.metric for g in load_gates(GATES).missions["mission_a"].gates}
LAT, PLAN, KV = A_METRIC["latency_p95"], A_METRIC["plan_length"], A_METRIC["kv_hit_ratio"]


def write_results(tmp_path: Path, mission: str, records: dict[int, list[ExampleRecord]]) -> Path:
    """A results.json whose final (evaluate) phase wrote ``records[seed]`` for each seed."""
    phases: dict = {}
    for seed, recs in records.items():
        d = tmp_path / mission / "evaluate" / f"seed_{seed}"
        write_records(d / "records.jsonl", recs)
        phases[f"seed_{seed}"] = {"dir": str(d), "metrics": {}, "duration_s": 1.0}
    path = tmp_path / mission / "results.json"
    atomic_write_json(
        path,
        {
            "mission": mission,
            "profile": "smoke",
            "dag_id": "bem_fleet",
            "run_id": "r1",
            "config_hash": "h",
            "final_phase": "evaluate",
            "phases": {"evaluate": phases},
        },
    )
    return path


def make_results(
    tmp_path: Path, *, em_gain: float, n: int = 200, seeds=(0, 1), latency_on=None
) -> Path:
    """A mission_a results.json whose evaluate phase wrote records for router and baseline.

    ``latency_on(i)`` says which examples carry the gated latency metric (default: all).
    """
    rng = np.random.default_rng(0)
    by_seed: dict[int, list[ExampleRecord]] = {}
    for seed in seeds:
        recs = []
        for i in range(n):
            for slice_tag in ("slice_a", "slice_b"):
                base_em = float(rng.random() < 0.4) * 100
                router_em = 100.0 if rng.random() < em_gain else base_em
                lat = float(rng.lognormal(2.0, 0.2))
                common = {PLAN: 3.0, "flip_rate": 0.1}
                timed = latency_on is None or latency_on(i)
                recs += [
                    ExampleRecord(
                        f"{slice_tag}-{i}",
                        "router",
                        seed,
                        {
                            "em": router_em,
                            "f1": router_em,
                            **({LAT: lat * 1.01} if timed else {}),
                            KV: 0.7,
                            **common,
                        },
                        (slice_tag,),
                    ),
                    ExampleRecord(
                        f"{slice_tag}-{i}",
                        "baseline",
                        seed,
                        {
                            "em": base_em,
                            "f1": base_em,
                            **({LAT: lat} if timed else {}),
                            KV: 0.3,
                            **common,
                        },
                        (slice_tag,),
                    ),
                ]
        by_seed[seed] = recs
    return write_results(tmp_path, "mission_a", by_seed)


def make_mission_c(tmp_path: Path, *, n: int = 200, base_events=(10, 70, 150)) -> Path:
    """mission_c with a rare 0/1 violation: 3 in 200 for the base model, 1 for safety."""
    rng = np.random.default_rng(3)
    by_seed: dict[int, list[ExampleRecord]] = {}
    for seed in (0, 1):
        recs = []
        for i in range(n):
            em = float(rng.random() < 0.5) * 100
            lat = float(rng.lognormal(2.0, 0.1))
            for system, violation, factor in (
                ("base", float(i in base_events), 1.0),
                ("safety", float(i == base_events[0]), 1.01),
            ):
                metrics = {"violation": violation, "em": em, "f1": em, "latency_ms": lat * factor}
                if system == "safety":
                    metrics["orthogonality"] = 0.99
                recs.append(ExampleRecord(f"c-{i}", system, seed, metrics, ("slice_b",)))
        by_seed[seed] = recs
    return write_results(tmp_path, "mission_c", by_seed)


def run(tmp_path: Path, *results: Path) -> tuple[dict, dict]:
    stats = tmp_path / "stats" / "statistical_results.json"
    doc = validate_results(
        list(results), gates_path=GATES, out_path=stats, confidence=0.95, n_resamples=1000
    )
    assert stats.exists()
    return doc, gate_results(
        stats,
        gates_path=GATES,
        out_dir=tmp_path / "gates",
        registry_path=tmp_path / "registry.json",
    )


def _decisions(report: dict) -> dict[str, dict]:
    return {d["mission"]: d for d in report["decisions"]}


def test_clear_win_is_promoted_and_registered(tmp_path: Path) -> None:
    doc, report = run(tmp_path, make_results(tmp_path, em_gain=0.3))
    by = {(r["metric"], r["slice"], r["statistic"]): r for r in doc["results"]}
    em = by[("em", "slice_b", "mean")]
    assert em["family"] == "performance" and em["n"] == 200 and em["n_seeds"] == 2
    assert em["ci_low"] > 1.5  # ~ +18 points
    assert by[("flip_rate", "slice_a", "mean")]["family"] == "reported"
    (decision,) = report["decisions"]
    assert decision["decision"] == "PROMOTED", decision
    registry = json.loads((tmp_path / "registry.json").read_text())
    assert "mission_a" in json.dumps(registry)
    assert (tmp_path / "gates" / "forest_mission_a.png").stat().st_size > 1000
    md = (tmp_path / "gates" / "promotion_report.md").read_text()
    assert "mission_a: PROMOTED" in md and "em_gain" in md


def test_no_gain_is_not_promoted_and_not_registered(tmp_path: Path) -> None:
    _, report = run(tmp_path, make_results(tmp_path, em_gain=0.0))
    (decision,) = report["decisions"]
    assert decision["decision"] == "REJECTED"
    em_gate = next(g for g in decision["gates"] if g["gate"] == "em_gain")
    assert em_gate["status"] == "failed"
    assert not (tmp_path / "registry.json").exists()


def test_one_missions_error_never_stops_another(tmp_path: Path) -> None:
    a = make_results(tmp_path / "a", em_gain=0.3)
    (tmp_path / "a" / "mission_a" / "evaluate" / "seed_1" / "records.jsonl").unlink()
    c = make_mission_c(tmp_path / "c")
    doc, report = run(tmp_path, a, c)
    err = doc["missions"]["mission_a"]["error"]
    assert (
        err.startswith("FileNotFoundError:") and "seed_1" in err and "wrote no records.jsonl" in err
    )
    assert {r["mission"] for r in doc["results"]} == {"mission_c"}
    decisions = _decisions(report)
    assert decisions["mission_a"]["decision"] == "ERROR"
    assert "wrote no records.jsonl" in decisions["mission_a"]["error"]
    assert decisions["mission_c"]["decision"] != "ERROR" and decisions["mission_c"]["gates"]
    md = (tmp_path / "gates" / "promotion_report.md").read_text()
    assert "## mission_a: ERROR" in md and "wrote no records.jsonl" in md


def test_records_changed_after_their_phase_are_refused(tmp_path: Path) -> None:
    """The final phase's manifest lists records.jsonl; records edited afterwards make that
    mission ERROR naming the file, and the other mission is judged as usual."""
    from bem_tasks.fleet.runs import write_manifest

    a = make_results(tmp_path / "a", em_gain=0.3)
    seed_1 = tmp_path / "a" / "mission_a" / "evaluate" / "seed_1"
    for seed_dir in seed_1.parent.iterdir():
        write_manifest(seed_dir, config_hash="h", seed=int(seed_dir.name[5:]))
    c = make_mission_c(tmp_path / "c")
    doc, _ = run(tmp_path, a, c)
    assert "error" not in doc["missions"]["mission_a"]  # intact: analysed
    records = seed_1 / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:-1]) + "\n")  # one record dropped
    doc, report = run(tmp_path, a, c)
    assert doc["missions"]["mission_a"]["error"] == (
        f"InputMismatch: {records}: sha256 differs from {seed_1 / 'manifest.json'} (changed "
        "after its phase wrote it); rerun that phase"
    )
    assert _decisions(report)["mission_c"]["decision"] != "ERROR"


def test_rare_zero_one_baseline_does_not_stop_the_statistics(tmp_path: Path) -> None:
    doc, report = run(tmp_path, make_mission_c(tmp_path), make_results(tmp_path, em_gain=0.3))
    assert not any("error" in m for m in doc["missions"].values())
    (v,) = [r for r in doc["results"] if r["metric"] == "violation" and r["relative"]]
    # 200 examples x 2 seeds = 400 cells, smallest positive baseline value 1: h = 1 / 800
    assert v["continuity"] == 1 / 800
    # tested at the gate's -30%: h (1 - 0.30) is added to the candidate, h to the baseline
    assert v["estimate"] == pytest.approx((1 / 200 + 0.7 / 800) / (3 / 200 + 1 / 800) - 1)
    gate = next(g for g in _decisions(report)["mission_c"]["gates"] if g["metric"] == "violation")
    # 3 -> 1 events in 200 examples cannot show a 30% reduction: undecided, not an exception
    assert gate["status"] == "underpowered" and "straddles the threshold -30.00%" in gate["reason"]
    assert _decisions(report)["mission_a"]["decision"] == "PROMOTED"


def test_a_metric_recorded_on_some_examples_is_paired_on_those(tmp_path: Path) -> None:
    # 100 of 200 examples timed, x 2 seeds: enough for a p95 gate (100 x 2 x 0.05 = 10 values
    # beyond the quantile)
    results = make_results(tmp_path, em_gain=0.3, latency_on=lambda i: i % 2 == 0)
    doc, report = run(tmp_path, results)
    assert "error" not in doc["missions"]["mission_a"]
    by = {(r["metric"], r["slice"], r["statistic"]): r for r in doc["results"]}
    assert by[("em", "slice_b", "mean")]["n"] == 200
    p95 = by[(LAT, "slice_b", "p95")]
    assert (p95["n"], p95["n_seeds"]) == (100, 2)
    # known answer: the pooled p95 of the 100 timed examples x 2 seeds, read back from the records

    lat: dict[str, list[float]] = {"router": [], "baseline": []}
    for seed in (0, 1):
        path = tmp_path / "mission_a" / "evaluate" / f"seed_{seed}" / "records.jsonl"
        for r in read_records(path):
            if "slice_b" in r.slices and LAT in r.metrics:
                lat[r.system].append(r.metrics[LAT])
    assert len(lat["router"]) == 200
    hd = {k: float(hdquantiles(v, [0.95])[0]) for k, v in lat.items()}  # Harrell-Davis p95
    expected = hd["router"] / hd["baseline"] - 1
    assert p95["estimate"] == pytest.approx(expected)
    assert by[(LAT, "slice_a", "mean")]["n"] == 100  # reported slice: same subset
    gates = {g["gate"]: g for g in _decisions(report)["mission_a"]["gates"]}
    assert (gates["latency_p95"]["n"], gates["em_gain"]["n"]) == (100, 200)
    assert _decisions(report)["mission_a"]["decision"] == "PROMOTED"


def test_a_metric_recorded_for_one_system_only_is_that_missions_error(tmp_path: Path) -> None:
    a = make_results(tmp_path / "a", em_gain=0.3)
    path = tmp_path / "a" / "mission_a" / "evaluate" / "seed_0" / "records.jsonl"

    recs = read_records(path)
    k = next(i for i, r in enumerate(recs) if r.system == "baseline" and "slice_b" in r.slices)
    metrics = {m: v for m, v in recs[k].metrics.items() if m != LAT}
    recs[k] = ExampleRecord(recs[k].example_id, "baseline", 0, metrics, recs[k].slices)
    write_records(path, recs)
    doc, report = run(tmp_path, a, make_mission_c(tmp_path / "c"))
    assert f"unpaired records for '{LAT}'" in doc["missions"]["mission_a"]["error"]
    assert _decisions(report)["mission_a"]["decision"] == "ERROR"
    assert _decisions(report)["mission_c"]["decision"] != "ERROR"


def test_cli_stats_names_a_missions_error_and_fails(tmp_path: Path, capsys) -> None:
    from bem_tasks.cli import main

    a = make_results(tmp_path / "a", em_gain=0.3)
    path = tmp_path / "a" / "mission_a" / "evaluate" / "seed_0" / "records.jsonl"
    recs = [r for r in read_records(path) if r.system != "baseline"]  # no baseline at all
    write_records(path, recs)
    out = tmp_path / "s.json"
    assert main(["stats", "--results", str(a), "--output", str(out), "--samples", "200"]) == 1
    printed = capsys.readouterr().out
    assert "mission_a: ERROR" in printed and "wrote" in printed
    assert "error" in json.loads(out.read_text())["missions"]["mission_a"]


def test_one_significance_level(tmp_path: Path) -> None:
    """alpha comes from the gates file only; statistics at another confidence are refused."""
    results = make_results(tmp_path, em_gain=0.3)
    out = tmp_path / "s.json"
    kw = dict(gates_path=GATES, out_path=out, n_resamples=200)
    with pytest.raises(ValueError, match=r"confidence = 0.9 .*gates_bem2.yaml:alpha = 0.05.*0.95"):
        validate_results([results], confidence=0.9, **kw)  # type: ignore[arg-type]
    doc = validate_results([results], confidence=0.95, **kw)  # type: ignore[arg-type]
    assert doc["settings"]["alpha"] == 0.05 and "two-sided" in doc["settings"]["sidedness"]


def test_cli_stats_gates_report_power(tmp_path: Path, capsys) -> None:
    from bem_tasks.cli import main

    results = make_results(tmp_path, em_gain=0.3)
    stats = tmp_path / "s" / "statistical_results.json"
    assert (
        main(["stats", "--results", str(results), "--output", str(stats), "--samples", "500"]) == 0
    )
    assert "em" in capsys.readouterr().out and stats.exists()
    assert (
        main(
            [
                "gates",
                "check",
                "--mission",
                "mission_a",
                "--gates",
                str(GATES),
                "--stats",
                str(stats),
                "--output",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mission_a: PROMOTED" in out and "em_gain" in out
    assert not (tmp_path / "registry.json").exists()  # checking is not promoting
    assert (
        main(["report", "--all-missions", "--stats", str(stats), "--output", str(tmp_path / "r")])
        == 0
    )
    assert (tmp_path / "r" / "promotion_report.json").exists()
    capsys.readouterr()
    assert main(["power", "--mission", "mission_a", "--effect-size", "0.5", "--power", "0.8"]) == 0
    assert "needs n=34 examples" in capsys.readouterr().out  # statsmodels TTestPower, d=0.5
    # without an effect size: each comparative gate of the mission, from its latest statistics
    argv = [
        "power",
        "--mission",
        "mission_a",
        "--stats",
        str(stats),
        "--output",
        str(tmp_path / "p"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mission_a: PROMOTED (power target 80%)" in out
    gates = [line.split()[0] for line in out.splitlines()[3:]]
    assert gates == ["em_gain", "f1_gain", "latency_p50", "latency_p95", "kv_hit_ratio"]
    assert main(["gates", "check", "--mission", "mission_c", "--stats", str(stats)]) == 2


def test_reported_metrics_follow_the_gates_direction(tmp_path: Path) -> None:
    doc, _ = run(tmp_path, make_results(tmp_path, em_gain=0.3))
    by = {(r["metric"], r["slice"], r["statistic"]): r for r in doc["results"]}
    # latency is gated `<=` on slice_b, so on slice_a (reported only) lower is better too
    assert by[(LAT, "slice_a", "mean")]["higher_is_better"] is False
    assert by[("em", "slice_a", "mean")]["higher_is_better"] is True
    # flip_rate has no gate; the gates file declares it lower-is-better
    assert by[("flip_rate", "slice_a", "mean")]["higher_is_better"] is False
    assert by[("flip_rate", "slice_b", "mean")]["higher_is_better"] is False


def test_cli_finds_the_latest_statistics_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Without --stats, `gates check` reads the newest statistics run's file, where the
    statistics DAG writes it: <artifact_root>/bem_statistical_validation/<run>/."""
    from bem_tasks.cli import main

    results = make_results(tmp_path, em_gain=0.3)
    root = tmp_path / "artifacts"
    stats = root / "bem_statistical_validation" / "run1" / "statistical_results.json"
    argv = ["stats", "--results", str(results), "--output", str(stats), "--samples", "500"]
    assert main(argv) == 0
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(root))
    capsys.readouterr()
    assert main(["gates", "check", "--mission", "mission_a"]) == 0
    assert "mission_a: PROMOTED" in capsys.readouterr().out
    assert (stats.parent / "promotion_report.json").exists()


def test_a_registry_that_cannot_be_written_is_that_missions_error(tmp_path: Path) -> None:
    """Registering a PROMOTED candidate fails (corrupt registry): that mission is ERROR with the
    message and its gates; the other missions are judged and the reports are written."""
    a = make_results(tmp_path / "a", em_gain=0.3)
    c = make_mission_c(tmp_path / "c")
    (tmp_path / "registry.json").write_text("{not json")
    _, report = run(tmp_path, a, c)
    decisions = _decisions(report)
    err = decisions["mission_a"]
    assert err["decision"] == "ERROR"
    assert "registering the candidate failed" in err["error"] and "not valid JSON" in err["error"]
    assert {g["status"] for g in err["gates"]} == {"passed"}  # why it was to be promoted
    assert decisions["mission_c"]["decision"] == "INSUFFICIENT_EVIDENCE"
    md = (tmp_path / "gates" / "promotion_report.md").read_text()
    assert "## mission_a: ERROR" in md and "## mission_c: INSUFFICIENT_EVIDENCE" in md
    assert (tmp_path / "registry.json").read_text() == "{not json"  # left as it was


def test_a_gate_stage_error_is_that_missions_error(tmp_path: Path) -> None:
    """The gates of one mission cannot be judged (a NaN absolute property): ERROR with the
    message; the other mission is judged and promoted as usual."""
    a = make_results(tmp_path / "a", em_gain=0.3)
    c = make_mission_c(tmp_path / "c")
    stats = tmp_path / "stats" / "statistical_results.json"
    validate_results([a, c], gates_path=GATES, out_path=stats, confidence=0.95, n_resamples=500)
    doc = json.loads(stats.read_text())
    doc["missions"]["mission_c"]["properties"]["orthogonality"][0] = float("nan")
    stats.write_text(json.dumps(doc))
    report = gate_results(
        stats, gates_path=GATES, out_dir=tmp_path / "gates", registry_path=tmp_path / "reg.json"
    )
    decisions = _decisions(report)
    assert decisions["mission_c"]["decision"] == "ERROR"
    assert decisions["mission_c"]["error"] == (
        "gates failed: ValueError: property 'orthogonality' has NaN or infinite values"
    )
    assert decisions["mission_a"]["decision"] == "PROMOTED"
    registry = json.loads((tmp_path / "reg.json").read_text())
    assert set(registry["missions"]) == {"mission_a"}
