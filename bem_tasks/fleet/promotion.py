"""Statistical validation and promotion gating of mission results (no Airflow here).

``validate_results`` turns missions' ``results.json`` files into ``statistical_results.json``:
per-example paired records of every seed are aligned (examples x seeds), every gated comparison
and every other metric/slice pair is analysed with paired BCa bootstrap CIs and BH-FDR within the
families of the gates config. ``gate_results`` turns that file into ``promotion_report.json``,
``promotion_report.md`` and one forest plot per mission, and records promoted candidates in the
registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bem_tasks.eval.records import ExampleRecord, paired_differences, read_records
from bem_tasks.gates import analysis_specs, evaluate_gates, load_gates, promote, render_report_md
from bem_tasks.io import atomic_write_json, atomic_write_text
from bem_tasks.stats import analyze, plot_forest

RECORDS = "records.jsonl"
REPORTED_FAMILY = "reported"


def mission_records(results_path: Path) -> tuple[dict[str, Any], list[ExampleRecord]]:
    """The results file and the per-example records of its final phase, all seeds."""
    results = json.loads(results_path.read_text())
    final = results["final_phase"]
    records: list[ExampleRecord] = []
    for seed_key, info in sorted(results["phases"][final].items()):
        path = Path(info["dir"]) / RECORDS
        if not path.exists():
            raise FileNotFoundError(
                f"{results_path}: {results['mission']}.{final} ({seed_key}) wrote no {RECORDS} "
                f"at {path}; the statistics need per-example records"
            )
        records.extend(read_records(path))
    return results, records


def _comparisons(
    gates_specs: list[dict[str, Any]],
    records: list[ExampleRecord],
    candidate: str,
    lower_is_better: set[str],
) -> list[dict[str, Any]]:
    """The gates' comparisons, then every other (metric, slice) reported with a null of 0."""
    specs = [dict(s) for s in gates_specs]
    done = {(s["metric"], s["slice"]) for s in specs}
    metrics = sorted({m for r in records if r.system == candidate for m in r.metrics})
    slices = sorted({t for r in records for t in r.slices})
    for metric in metrics:
        for slice_tag in slices:
            if (metric, slice_tag) not in done:
                specs.append(
                    {
                        "mission": gates_specs[0]["mission"] if gates_specs else "",
                        "metric": metric,
                        "slice": slice_tag,
                        "family": REPORTED_FAMILY,
                        "higher_is_better": metric not in lower_is_better,
                        "relative": False,
                        "statistic": "mean",
                        "null_value": 0.0,
                    }
                )
    return specs


def validate_results(
    results_paths: Iterable[Path],
    *,
    gates_path: Path,
    out_path: Path,
    confidence: float,
    n_resamples: int,
    alpha: float,
) -> dict[str, Any]:
    gates = load_gates(gates_path)
    all_specs: list[dict[str, Any]] = []
    missions: dict[str, Any] = {}
    for results_path in results_paths:
        results, records = mission_records(Path(results_path))
        mission = results["mission"]
        if mission not in gates.missions:
            raise ValueError(f"{gates_path}: no gates for mission '{mission}' ({results_path})")
        mg = gates.missions[mission]
        # A gate's direction (e.g. latency `<=`) says which way is better for reported slices too.
        lower = {g.metric for g in mg.gates if not g.higher_is_better} | set(mg.lower_is_better)
        specs = [
            {**s, "mission": mission}
            for s in _comparisons(analysis_specs(gates, mission), records, mg.candidate, lower)
        ]
        for spec in specs:
            paired = paired_differences(
                records,
                metric=spec["metric"],
                candidate=mg.candidate,
                baseline=mg.baseline,
                slice_tag=spec["slice"],
            )
            spec["candidate"], spec["baseline"] = paired.candidate, paired.baseline
            spec["n_seeds"] = len(paired.seeds)
        all_specs.extend(specs)
        # Absolute gates judge the candidate alone, on the gatekeeping slice, every example.
        properties = {}
        for gate in mg.gates:
            if gate.kind == "absolute":
                values = [
                    r.metrics[gate.metric]
                    for r in records
                    if r.system == mg.candidate
                    and gate.slice in r.slices
                    and gate.metric in r.metrics
                ]
                properties[gate.metric] = values
        missions[mission] = {
            "results": str(results_path),
            "dag_id": results["dag_id"],
            "run_id": results["run_id"],
            "profile": results["profile"],
            "config_hash": results["config_hash"],
            "n_records": len(records),
            "properties": properties,
        }
    n_seeds = [s.pop("n_seeds") for s in all_specs]
    analysed = analyze(
        all_specs, confidence=confidence, n_resamples=n_resamples, seed=0, alpha=alpha
    )
    for result, seeds in zip(analysed, n_seeds, strict=True):
        result["n_seeds"] = seeds
    doc = {
        "settings": {
            "confidence": confidence,
            "n_resamples": n_resamples,
            "alpha": alpha,
            "method": "paired BCa bootstrap (cluster over examples when several seeds), BH-FDR",
            "gates": str(gates_path),
        },
        "missions": missions,
        "results": analysed,
    }
    atomic_write_json(out_path, doc)
    return doc


def gate_results(
    stats_path: Path,
    *,
    gates_path: Path,
    out_dir: Path,
    registry_path: Path,
    alpha: float,
    power: float,
    missions: Iterable[str] | None = None,
    register: bool = True,
) -> dict[str, Any]:
    doc = json.loads(stats_path.read_text())
    wanted = set(missions) if missions is not None else set(doc["missions"])
    unknown = wanted - set(doc["missions"])
    if unknown:
        raise ValueError(
            f"{stats_path}: no results for {sorted(unknown)} (has {sorted(doc['missions'])})"
        )
    gates = load_gates(gates_path)
    decisions = []
    for mission, info in doc["missions"].items():
        if mission not in wanted:
            continue
        results = [r for r in doc["results"] if r["mission"] == mission]
        properties = {k: np.asarray(v, dtype=float) for k, v in info["properties"].items()}
        decision = evaluate_gates(mission, gates, results, properties, alpha=alpha, power=power)
        decisions.append(decision)
        plot_forest(
            [r for r in results if r["family"] != REPORTED_FAMILY] or results,
            out_dir / f"forest_{mission}.png",
            title=f"{mission}: {decision.decision}",
        )
        if register and decision.decision == "PROMOTED":
            promote(
                registry_path,
                mission,
                info["run_id"],
                str(Path(info["results"]).parent),
                decision,
                extra={"config_hash": info["config_hash"], "profile": info["profile"]},
            )
    report: dict[str, Any] = {
        "statistical_results": str(stats_path),
        "registry": str(registry_path) if register else None,
        "decisions": [d.to_json() for d in decisions],
    }
    report["markdown"] = render_report_md(
        decisions, results=[r for r in doc["results"] if r["mission"] in wanted]
    )
    atomic_write_json(
        out_dir / "promotion_report.json", {k: v for k, v in report.items() if k != "markdown"}
    )
    atomic_write_text(out_dir / "promotion_report.md", report["markdown"])
    return report


def latest(root: Path, pattern: str) -> Path:
    """Newest file matching ``pattern`` under ``root`` (by modification time)."""
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}; run the pipeline first")
    return found[-1]
