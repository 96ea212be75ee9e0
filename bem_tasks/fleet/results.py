"""A mission's results file: what its phases produced, gathered for the statistics DAG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bem_tasks.config.loader import load_fleet
from bem_tasks.fleet.runs import RunLayout, read_manifest
from bem_tasks.io import atomic_write_json

RESULTS = "results.json"


def collect_phase_outputs(
    mission_dir: Path, phases: list[str], variants: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """metrics.json of every phase (and seed) that completed, keyed phase -> seed -> metrics. A
    mapped phase (``variants[phase]``) is keyed phase -> ``<variant>/seed_N`` -> metrics."""
    out: dict[str, Any] = {}
    for phase in phases:
        phase_dir = mission_dir / phase
        mapped = (variants or {}).get(phase)
        if mapped:
            dirs = [d for v in mapped for d in sorted((phase_dir / v).glob("seed_*"))]
        else:
            dirs = sorted(phase_dir.glob("seed_*")) or ([phase_dir] if phase_dir.exists() else [])
        for d in dirs:
            manifest = read_manifest(d)
            if manifest is None or manifest.get("status") != "complete":
                continue
            metrics = json.loads((d / "metrics.json").read_text())
            seed_key = d.name if d.name.startswith("seed_") else "all"
            if mapped:
                seed_key = f"{d.parent.name}/{seed_key}"
            out.setdefault(phase, {})[seed_key] = {
                "dir": str(d),
                "metrics": metrics,
                "duration_s": manifest.get("duration_s"),
            }
    return out


def publish_mission_results(mission: str, *, profile: str, dag_id: str, run_id: str) -> dict:
    """Write ``<run>/<mission>/results.json``; fail if the mission's last phase produced nothing."""
    cfg = load_fleet(None, profile)
    layout = RunLayout(cfg.artifact_root, dag_id, run_id)
    specs = cfg.experiments[mission].phases
    phases = list(specs)
    variants = {q: s.variants for q, s in specs.items() if s.variants}
    outputs = collect_phase_outputs(layout.mission_dir(mission), phases, variants)
    final = phases[-1]
    if final not in outputs:
        raise RuntimeError(
            f"{mission}: final phase '{final}' has no complete output under "
            f"{layout.mission_dir(mission)}; nothing to publish"
        )
    results = {
        "mission": mission,
        "profile": profile,
        "dag_id": dag_id,
        "run_id": run_id,
        "config_hash": cfg.mission_hash(mission),
        "final_phase": final,
        "phases": outputs,
    }
    path = atomic_write_json(layout.mission_dir(mission) / RESULTS, results)
    return {"mission": mission, "results": str(path), "seeds": sorted(outputs[final])}
