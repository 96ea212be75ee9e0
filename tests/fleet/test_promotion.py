"""Validation + gating of mission results files, on hand-made per-example records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bem_tasks.eval.records import ExampleRecord, write_records
from bem_tasks.fleet.promotion import gate_results, validate_results
from bem_tasks.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
GATES = ROOT / "configs" / "gates_bem2.yaml"


def make_results(tmp_path: Path, *, em_gain: float, n: int = 150, seeds=(0, 1)) -> Path:
    """A mission_a results.json whose evaluate phase wrote records for router and baseline."""
    rng = np.random.default_rng(0)
    phases: dict = {}
    for seed in seeds:
        d = tmp_path / "mission_a" / "evaluate" / f"seed_{seed}"
        recs = []
        for i in range(n):
            for slice_tag in ("slice_a", "slice_b"):
                base_em = float(rng.random() < 0.4) * 100
                router_em = 100.0 if rng.random() < em_gain else base_em
                lat = float(rng.lognormal(2.0, 0.2))
                common = {"plan_length": 3.0, "flip_rate": 0.1}
                recs += [
                    ExampleRecord(
                        f"{slice_tag}-{i}",
                        "router",
                        seed,
                        {
                            "em": router_em,
                            "f1": router_em,
                            "latency_ms": lat * 1.01,
                            "kv_hit_ratio": 0.7,
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
                            "latency_ms": lat,
                            "kv_hit_ratio": 0.3,
                            **common,
                        },
                        (slice_tag,),
                    ),
                ]
        write_records(d / "records.jsonl", recs)
        phases[f"seed_{seed}"] = {"dir": str(d), "metrics": {}, "duration_s": 1.0}
    path = tmp_path / "mission_a" / "results.json"
    atomic_write_json(
        path,
        {
            "mission": "mission_a",
            "profile": "smoke",
            "dag_id": "bem_fleet",
            "run_id": "r1",
            "config_hash": "h",
            "final_phase": "evaluate",
            "phases": {"evaluate": phases},
        },
    )
    return path


def run(tmp_path: Path, results: Path) -> dict:
    stats = tmp_path / "stats" / "statistical_results.json"
    doc = validate_results(
        [results], gates_path=GATES, out_path=stats, confidence=0.95, n_resamples=1000, alpha=0.05
    )
    assert stats.exists()
    return doc, gate_results(
        stats,
        gates_path=GATES,
        out_dir=tmp_path / "gates",
        registry_path=tmp_path / "registry.json",
        alpha=0.05,
        power=0.8,
    )


def test_clear_win_is_promoted_and_registered(tmp_path: Path) -> None:
    doc, report = run(tmp_path, make_results(tmp_path, em_gain=0.3))
    by = {(r["metric"], r["slice"], r["statistic"]): r for r in doc["results"]}
    em = by[("em", "slice_b", "mean")]
    assert em["family"] == "performance" and em["n"] == 150 and em["n_seeds"] == 2
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


def test_missing_records_name_the_file(tmp_path: Path) -> None:
    results = make_results(tmp_path, em_gain=0.3)
    (tmp_path / "mission_a" / "evaluate" / "seed_1" / "records.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="seed_1.*wrote no records.jsonl"):
        run(tmp_path, results)


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
    assert by[("latency_ms", "slice_a", "mean")]["higher_is_better"] is False
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
