"""`bem-fleet pools sync` (bem_tasks.fleet.pools) against a real, throw-away Airflow metadata DB.

The test process has already imported Airflow with its own settings, so each scenario runs in
a subprocess whose AIRFLOW_HOME and SQLite DB are a per-test copy of one migrated once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MARKER = "[bem-fleet]"

# Seeds the DB with (name, slots, description) pools, then runs sync_pools once per mode
# ("dry" or "wet") and prints each run's actions and the pools after it.
SCENARIO = """
import json, sys
from airflow.models.pool import Pool
from bem_tasks.config.loader import load_fleet
from bem_tasks.fleet.pools import sync_pools

config, seed, modes = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
for name, slots, description in seed:
    Pool.create_or_update_pool(name, slots, description, include_deferred=False)
steps = []
for mode in modes:
    actions = sync_pools(load_fleet(config), dry_run=mode == "dry")
    pools = {p.pool: [p.slots, p.description] for p in Pool.get_pools()}
    steps.append({"actions": actions, "pools": pools})
print(json.dumps(steps))
"""


def _env(home: Path) -> dict[str, str]:
    # Everything that could point Airflow at another database is set explicitly.
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("pools_airflow_home")
    subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=_env(home),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return home / "airflow.db"


@pytest.fixture
def config(project: Path, edit_yaml) -> Path:
    """The shipped config with known device classes: cpu x4, rtx4090_24gb x3, h100_80gb x2."""
    path = project / "configs" / "bem_fleet_architecture.yml"

    def devices(data: dict) -> None:
        for name, n in {"cpu": 4, "rtx4090_24gb": 3, "h100_80gb": 2}.items():
            data["device_classes"][name]["devices"] = n
        data["device_classes"]["cpu"]["hardware"] = "CPU slots"
        data["device_classes"]["rtx4090_24gb"]["hardware"] = "RTX 4090"
        data["device_classes"]["h100_80gb"]["hardware"] = "H100"

    edit_yaml(path, devices)
    return path


def sync(migrated_db: Path, tmp_path: Path, config: Path, seed: list, *modes: str) -> list[dict]:
    home = tmp_path / "airflow_home"
    home.mkdir()
    shutil.copy(migrated_db, home / "airflow.db")
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(config), json.dumps(seed), *modes],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    steps: list[dict] = json.loads(done.stdout.strip().splitlines()[-1])
    return steps


OURS = {
    "cpu": [4, f"{MARKER} cpu: CPU slots"],
    "rtx4090_24gb": [3, f"{MARKER} gpu: RTX 4090"],
    "h100_80gb": [2, f"{MARKER} gpu: H100"],
}


def test_creates_one_pool_per_device_class_then_is_in_sync(
    migrated_db: Path, tmp_path: Path, config: Path
) -> None:
    first, second = sync(migrated_db, tmp_path, config, [], "wet", "wet")
    assert first["actions"] == [
        "create pool cpu slots=4",
        "create pool rtx4090_24gb slots=3",
        "create pool h100_80gb slots=2",
    ]
    assert first["pools"] == {"default_pool": [128, "Default pool"], **OURS}
    assert second == {"actions": [], "pools": first["pools"]}


def test_updates_and_deletes_only_its_own_pools_and_dry_run_changes_nothing(
    migrated_db: Path, tmp_path: Path, config: Path
) -> None:
    seed = [
        ["cpu", 9, f"{MARKER} cpu: CPU slots"],  # ours, wrong size
        ["h100_80gb", 5, "reserved by ops"],  # a hand-made pool with a device class's name
        ["a100_40gb", 2, f"{MARKER} gpu: A100"],  # ours, no longer in the config
        ["scratch", 7, "made by hand"],
        ["borrowed", 1, f"copied from {MARKER} once"],  # the marker, but not as the prefix
    ]
    before = {"default_pool": [128, "Default pool"], **{n: [s, d] for n, s, d in seed}}
    dry, wet = sync(migrated_db, tmp_path, config, seed, "dry", "wet")

    expected_actions = [
        "update pool cpu slots=9->4",
        "create pool rtx4090_24gb slots=3",
        "take over pool h100_80gb (made by hand) slots=2",
        "delete pool a100_40gb (no longer in config)",
    ]
    assert dry == {"actions": expected_actions, "pools": before}
    assert wet["actions"] == expected_actions
    assert wet["pools"] == {
        "default_pool": [128, "Default pool"],
        "scratch": [7, "made by hand"],
        "borrowed": [1, f"copied from {MARKER} once"],
        **OURS,
    }
