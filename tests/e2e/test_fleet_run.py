"""End to end: `airflow dags test bem_fleet` on the smoke profile with the shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bem_tasks.config.loader import load_fleet
from tests.e2e.conftest import ROOT, dags_test

pytestmark = pytest.mark.e2e


def test_bem_fleet_smoke_run(airflow_env: dict[str, str]) -> None:
    result = dags_test(airflow_env, "bem_fleet", '{"profile": "smoke"}')
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    cfg = load_fleet(ROOT / "configs" / "bem_fleet_architecture.yml", "smoke")
    artifacts = Path(airflow_env["BEM_FLEET_ARTIFACT_ROOT"]) / "bem_fleet"
    if not cfg.enabled_missions:
        assert "No mission is enabled in the fleet config: nothing to train." in log
        assert not artifacts.exists()
        return
    (run_dir,) = artifacts.iterdir()
    for mission in cfg.enabled_missions:
        results = json.loads((run_dir / mission / "results.json").read_text())
        final = results["final_phase"]
        assert sorted(results["phases"][final]) == [f"seed_{s}" for s in cfg.arch.fleet.seeds]
        for phase in cfg.experiments[mission].phases:
            assert phase in results["phases"], f"{mission}.{phase} left no complete output"
