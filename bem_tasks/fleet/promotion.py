"""Statistical validation and promotion gating of mission results (no Airflow here).

``validate_results`` turns missions' ``results.json`` files into ``statistical_results.json``:
per-example paired records of every seed are aligned (examples x seeds; a metric recorded on some
examples only is paired on those), every gated comparison and every other metric/slice pair is
analysed with paired bootstrap BCa CIs (of means, or of Harrell-Davis quantiles) and BH-FDR
within the families of the gates config.
``gate_results`` turns that file into ``promotion_report.json``, ``promotion_report.md`` and one
forest plot per mission, and records promoted candidates in the registry. Each mission is
analysed and judged on its own: one that fails is reported with its error (decision ERROR) and
never stops the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bem_tasks.eval.records import ExampleRecord, PairedArray, paired_differences, read_records
from bem_tasks.fleet.runs import MANIFEST, InputMismatch, read_manifest
from bem_tasks.fleet.summary import read_json_file
from bem_tasks.gates import (
    Decision,
    GatesConfig,
    analysis_specs,
    error_decision,
    evaluate_gates,
    load_gates,
    promote,
    render_report_md,
)
from bem_tasks.io import atomic_write_json, atomic_write_text, sha256_file
from bem_tasks.stats import analyze, plot_forest

RECORDS = "records.jsonl"
REPORTED_FAMILY = "reported"


def within_artifact_root(root: Path, param: str, paths: Any) -> list[str]:
    """``paths`` (a list-valued trigger param), each inside the artifact root; see
    ``path_within_artifact_root``."""
    if not isinstance(paths, list):
        raise ValueError(f"{param}: expected a list of paths, got {paths!r}")
    return [path_within_artifact_root(root, f"{param}[{i}]", p) for i, p in enumerate(paths)]


def path_within_artifact_root(root: Path, where: str, path: Any) -> str:
    """``path`` if it lies inside the artifact root (symlinks resolved), else ValueError naming
    the param: a manual run must not read, or write reports beside, files the fleet does not
    own."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expected a path, got {path!r}")
    base = root.resolve()
    if not Path(path).resolve().is_relative_to(base):
        raise ValueError(
            f"{where}: {path} is outside the artifact root {base}; give a file the fleet wrote "
            "there (<artifact_root>/<dag>/<run>/...)"
        )
    return path


def mission_records(results_path: Path) -> tuple[dict[str, Any], list[ExampleRecord]]:
    """The results file and the per-example records of its final phase, all seeds."""
    results = read_json_file(results_path)
    if not isinstance(results, dict):
        raise ValueError(f"{results_path}: expected a JSON object (a mission's results.json)")
    for key in ("mission", "dag_id", "run_id", "profile", "config_hash", "final_phase"):
        if not isinstance(results.get(key), str):
            raise ValueError(f"{results_path}:{key}: expected a string, got {results.get(key)!r}")
    final = results["final_phase"]
    seeds = (
        results.get("phases", {}).get(final) if isinstance(results.get("phases"), dict) else None
    )
    if not isinstance(seeds, dict) or not all(
        isinstance(i, dict) and isinstance(i.get("dir"), str) for i in seeds.values()
    ):
        raise ValueError(
            f"{results_path}:phases.{final}: expected {{seed: {{dir: <path>, ...}}}} for the "
            "final phase"
        )
    records: list[ExampleRecord] = []
    for seed_key, info in sorted(seeds.items()):
        path = Path(info["dir"]) / RECORDS
        if not path.exists():
            raise FileNotFoundError(
                f"{results_path}: {results['mission']}.{final} ({seed_key}) wrote no {RECORDS} "
                f"at {path}; the statistics need per-example records"
            )
        _check_recorded(path)
        records.extend(read_records(path))
    return results, records


def _check_recorded(path: Path) -> None:
    """The records file must have the sha256 its phase's manifest lists (when the folder has a
    manifest, as every phase run by the fleet does): statistics of records changed after the
    phase would judge a candidate on data it never produced."""
    manifest = read_manifest(path.parent)
    if manifest is None:
        return
    files = manifest.get("files")
    listed = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(listed, dict) or listed.get("sha256") != sha256_file(path):
        raise InputMismatch(
            f"{path}: sha256 differs from {path.parent / MANIFEST} (changed after its phase "
            "wrote it); rerun that phase"
        )


def _comparisons(
    gates_specs: list[dict[str, Any]],
    records: list[ExampleRecord],
    candidate: str,
    lower_is_better: set[str],
) -> list[dict[str, Any]]:
    """The gates' comparisons, then every other (metric, slice) the candidate has, null 0."""
    specs = [dict(s) for s in gates_specs]
    done = {(s["metric"], s["slice"]) for s in specs}
    # Only the (metric, slice) pairs that occur: a metric recorded on some examples only (e.g.
    # latency on a subset) has no comparison on a slice where no example carries it.
    present = sorted(
        {(m, t) for r in records if r.system == candidate for m in r.metrics for t in r.slices}
    )
    for metric, slice_tag in present:
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


def pair_metric(
    records: list[ExampleRecord], metric: str, candidate: str, baseline: str, slice_tag: str
) -> PairedArray | None:
    """Candidate and baseline values of ``metric`` as examples x seeds, on the examples that have it.

    Records without the metric are left out first, so a metric recorded on a subset of the
    examples is paired on that subset. What remains must pair exactly (both systems, every seed
    of every example), else ValueError: an example measured for one system only is a bug, not a
    subset. None when one of the systems never recorded the metric on the slice (nothing to
    compare, e.g. a candidate-only property such as orthogonality).
    """
    having = [r for r in records if metric in r.metrics and slice_tag in r.slices]
    if not all(any(r.system == s for r in having) for s in (candidate, baseline)):
        return None
    return paired_differences(
        having, metric=metric, candidate=candidate, baseline=baseline, slice_tag=slice_tag
    )


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _mission_specs(
    results_path: Path, gates: GatesConfig, gates_path: Path
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """One mission's identity, its entry in the statistics file, and its paired comparisons."""
    results, records = mission_records(results_path)
    mission = results["mission"]
    if mission not in gates.missions:
        raise ValueError(f"{gates_path}: no gates for mission '{mission}' ({results_path})")
    mg = gates.missions[mission]
    # A gate's direction (e.g. latency `<=`) says which way is better for reported slices too.
    lower = {g.metric for g in mg.gates if not g.higher_is_better} | set(mg.lower_is_better)
    specs = []
    for spec in _comparisons(analysis_specs(gates, mission), records, mg.candidate, lower):
        paired = pair_metric(records, spec["metric"], mg.candidate, mg.baseline, spec["slice"])
        if paired is None:
            continue  # nothing recorded: the gate reports the measurement as missing
        specs.append(
            {**spec, "mission": mission, "candidate": paired.candidate, "baseline": paired.baseline}
        )
    # Absolute gates judge the candidate alone, on the gate's slice, every example and seed.
    properties = {
        gate.metric: [
            r.metrics[gate.metric]
            for r in records
            if r.system == mg.candidate and gate.slice in r.slices and gate.metric in r.metrics
        ]
        for gate in mg.gates
        if gate.kind == "absolute"
    }
    info = {
        "results": str(results_path),
        "dag_id": results["dag_id"],
        "run_id": results["run_id"],
        "profile": results["profile"],
        "config_hash": results["config_hash"],
        "n_records": len(records),
        "properties": properties,
    }
    return mission, info, specs


def validate_results(
    results_paths: Iterable[Path],
    *,
    gates_path: Path,
    out_path: Path,
    confidence: float,
    n_resamples: int,
) -> dict[str, Any]:
    """Analyse every mission's paired records; write and return ``statistical_results.json``.

    The significance level is the gates file's ``alpha``, and ``confidence`` must be ``1 -
    alpha`` (gates are judged on two-sided intervals). A mission whose records or statistics fail is kept with ``error`` (its message) and no
    results; the other missions are analysed as usual.
    """
    gates = load_gates(gates_path)
    if not math.isclose(confidence, 1.0 - gates.alpha, abs_tol=1e-9):
        raise ValueError(
            f"statistics.confidence = {confidence} but {gates_path}:alpha = {gates.alpha}: gates "
            f"are judged on two-sided 1 - alpha intervals, so confidence must be "
            f"{1.0 - gates.alpha:g}"
        )
    missions: dict[str, Any] = {}
    analysed: list[dict[str, Any]] = []
    for results_path in map(Path, results_paths):
        # Before the file is read the mission is known only by its folder (<run>/<mission>/).
        mission = results_path.parent.name
        try:
            mission, info, specs = _mission_specs(results_path, gates, gates_path)
            if mission in missions:
                raise ValueError(
                    f"results for {mission} given twice ({missions[mission]['results']} and "
                    f"{results_path})"
                )
            results = analyze(
                specs, confidence=confidence, n_resamples=n_resamples, seed=0, alpha=gates.alpha
            )
        except Exception as exc:  # noqa: BLE001 - reported for this mission, the others go on
            analysed = [r for r in analysed if r["mission"] != mission]
            missions[mission] = {"results": str(results_path), "error": _error(exc)}
            continue
        missions[mission] = info
        analysed.extend(results)
    doc = {
        "settings": {
            "confidence": confidence,
            "n_resamples": n_resamples,
            "alpha": gates.alpha,
            "sidedness": "two-sided 1 - alpha intervals and p-values; a gate passes only when "
            "the whole interval is on its passing side (one-sided level alpha / 2)",
            "method": "paired bootstrap over examples (cluster bootstrap with several seeds), "
            "BCa intervals: of the mean for mean gates, of the Harrell-Davis quantile of the "
            "pooled example x seed values for median/pNN gates; p-values by interval inversion, "
            "the exact sign test when the bootstrap is degenerate; BH-FDR within families",
            "gates": str(gates_path),
        },
        "missions": missions,
        "results": analysed,
    }
    atomic_write_json(out_path, doc)
    return doc


def _decide(
    mission: str,
    info: dict[str, Any],
    results: list[dict[str, Any]],
    gates: GatesConfig,
    out_dir: Path,
) -> Decision:
    if "error" in info:
        return error_decision(mission, gates, f"statistics failed: {info['error']}")
    properties = {k: np.asarray(v, dtype=float) for k, v in info["properties"].items()}
    decision = evaluate_gates(mission, gates, results, properties)
    plotted = [r for r in results if not r.get("error")]
    gated = [r for r in plotted if r["family"] != REPORTED_FAMILY] or plotted
    if gated:
        plot_forest(
            gated, out_dir / f"forest_{mission}.png", title=f"{mission}: {decision.decision}"
        )
    return decision


def gate_results(
    stats_path: Path,
    *,
    gates_path: Path,
    out_dir: Path,
    registry_path: Path,
    missions: Iterable[str] | None = None,
    register: bool = True,
) -> dict[str, Any]:
    """Judge the gates of every mission in ``stats_path``; write the reports, register winners.

    The significance level and power are the gates file's. A mission whose
    statistics failed, or whose gates cannot be judged, gets the decision ERROR with the message;
    the other missions are judged as usual.
    """
    doc = read_json_file(stats_path)
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("missions"), dict)
        or not isinstance(doc.get("results"), list)
    ):
        raise ValueError(
            f"{stats_path}: expected statistical results ({{missions: {{...}}, results: [...]}})"
        )
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
        try:
            decision = _decide(mission, info, results, gates, out_dir)
        except Exception as exc:  # noqa: BLE001 - this mission is ERROR, the others go on
            decision = error_decision(mission, gates, f"gates failed: {_error(exc)}")
        if register and decision.decision == "PROMOTED":
            try:
                promote(
                    registry_path,
                    mission,
                    info["run_id"],
                    str(Path(info["results"]).parent),
                    decision,
                    extra={"config_hash": info["config_hash"], "profile": info["profile"]},
                )
            except Exception as exc:  # noqa: BLE001 - not registered: ERROR, the others go on
                message = f"the gates passed but registering the candidate failed: {_error(exc)}"
                decision = error_decision(mission, gates, message).model_copy(
                    update={"gates": decision.gates}
                )
        decisions.append(decision)
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
