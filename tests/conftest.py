"""Shared fixtures: a writable copy of the project's configs and a toy mission for the factory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def unavailable(reason: str) -> None:
    """Skip a test whose service or tool is missing, except on CI (BEM_FLEET_REQUIRE_SERVICES=1,
    set by .ci/run), where a missing one is a failure: CI must never pass by skipping."""
    if os.environ.get("BEM_FLEET_REQUIRE_SERVICES") == "1":
        pytest.fail(f"BEM_FLEET_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason} (set BEM_FLEET_REQUIRE_SERVICES=1 to make this a failure)")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of configs/ and experiments/ (the project root for relative paths)."""
    for name in ("configs", "experiments"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def edit_yaml() -> Callable[..., None]:
    """edit_yaml(path, fn): load with safe_load, let fn mutate the dict, write it back."""

    def edit(path: Path, fn: Callable[[dict], object]) -> None:
        data = yaml.safe_load(path.read_text())
        fn(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    return edit


@pytest.fixture
def toy_mission(project: Path, monkeypatch: pytest.MonkeyPatch, edit_yaml) -> str:
    """Register tests/fixtures/toy_mission.py as an implemented mission and enable it.

    It exercises the DAG factory and the phase runner without training anything; the real
    missions are covered by their own tests and the end-to-end run.
    """
    from bem_tasks.missions import registry

    impl = registry.MissionImpl(
        module="tests.fixtures.toy_mission",
        phases=("prepare", "fit", "evaluate"),
        params_model="tests.fixtures.toy_mission:ToyParams",
    )
    monkeypatch.setitem(registry.IMPLEMENTED, "mission_toy", impl)
    shutil.copy(ROOT / "tests" / "fixtures" / "mission_toy.yml", project / "experiments")

    def add(data: dict) -> None:
        data["missions"] = {
            "mission_toy": {
                "title": "Toy",
                "enabled": True,
                "experiment": "experiments/mission_toy.yml",
                "depends_on": [],
            },
            **data["missions"],
        }

    edit_yaml(project / "configs" / "bem_fleet_architecture.yml", add)
    return "mission_toy"
