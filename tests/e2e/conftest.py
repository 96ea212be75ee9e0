"""An isolated Airflow home (SQLite, LocalExecutor) for in-process `airflow dags test` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "BEM_FLEET_CONFIG": str(ROOT / "configs" / "bem_fleet_architecture.yml"),
        "BEM_FLEET_ARTIFACT_ROOT": str(home / "artifacts"),
        "BEM_FLEET_LOCK_DIR": str(home / "locks"),
        "WANDB_MODE": "offline",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True
    )
    subprocess.run(
        [str(BIN / "bem-fleet"), "pools", "sync"], env=env, check=True, capture_output=True
    )
    return env


def dags_test(
    env: dict[str, str], dag_id: str, conf: str, timeout: int = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "airflow"), "dags", "test", dag_id, "-c", conf],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
