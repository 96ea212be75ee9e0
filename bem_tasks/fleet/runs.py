"""Run-scoped artifact layout and manifests.

Every phase writes under ``<artifact_root>/<dag_id>/<run_id>/<mission>/<phase>/[seed_<n>/]`` (a
mapped phase under ``<phase>/<variant>/seed_<n>/``, one folder and manifest per variant) and
finishes by writing ``manifest.json``: the sha256 of each file, the config hash, the seed, the git
SHA and the versions of the packages that produced it. A phase whose manifest is complete and
matches is not recomputed (tasks are idempotent: a rerun gives the same artifacts).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from bem_tasks.io import atomic_write_json, file_digests, sha256_file, utc_now

# The DAG ids live here, not in dags.py, so that the CLI can use them without importing Airflow.
FLEET_DAG_ID = "bem_fleet"
STATS_DAG_ID = "bem_statistical_validation"
GATES_DAG_ID = "bem_promotion_gates"
MAINTENANCE_DAG_ID = "bem_fleet_maintenance"


def mission_dag_id(mission: str) -> str:
    """The DAG that runs one mission alone."""
    return f"bem_{mission}"


MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "bem-fleet",
    "apache-airflow",
    "torch",
    "transformers",
    "peft",
    "numpy",
    "scipy",
    "statsmodels",
)


def safe_component(name: str) -> str:
    """Airflow run ids hold ':' and '+'; keep them readable but portable as folder names."""
    cleaned = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"cannot make a folder name out of {name!r}")
    return cleaned


@dataclass(frozen=True)
class RunLayout:
    artifact_root: Path
    dag_id: str
    run_id: str

    @property
    def run_dir(self) -> Path:
        return self.artifact_root / safe_component(self.dag_id) / safe_component(self.run_id)

    def mission_dir(self, mission: str) -> Path:
        return self.run_dir / mission

    def phase_dir(
        self, mission: str, phase: str, seed: int | None = None, variant: str | None = None
    ) -> Path:
        d = self.mission_dir(mission) / phase
        if variant is not None:
            d /= safe_component(variant)
        return d if seed is None else d / f"seed_{seed}"


@cache
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(
    phase_dir: Path,
    *,
    config_hash: str,
    seed: int | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Hash every file under ``phase_dir`` (except the manifest) and write the manifest last."""
    files = file_digests(phase_dir, skip=lambda p: p.name == MANIFEST or p.name.startswith("."))
    manifest = {
        "status": "complete",
        "created_at": utc_now(),
        "config_hash": config_hash,
        "seed": seed,
        "git_sha": git_sha(),
        "packages": package_versions(),
        "files": files,
        **(extra or {}),
    }
    return atomic_write_json(phase_dir / MANIFEST, manifest)


def read_manifest(phase_dir: Path) -> dict[str, Any] | None:
    path = phase_dir / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def verify_manifest(phase_dir: Path) -> list[str]:
    """Problems with a phase's files compared to its manifest; [] means intact."""
    manifest = read_manifest(phase_dir)
    if manifest is None:
        return [f"{phase_dir / MANIFEST}: missing"]
    problems = []
    for rel, info in manifest.get("files", {}).items():
        path = phase_dir / rel
        if not path.exists():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def is_complete(phase_dir: Path, config_hash: str, seed: int | None) -> bool:
    """True when the phase already ran with this config and seed and its files are intact."""
    try:
        manifest = read_manifest(phase_dir)
    except ValueError:
        return False
    return (
        manifest is not None
        and manifest.get("status") == "complete"
        and manifest.get("config_hash") == config_hash
        and manifest.get("seed") == seed
        and manifest.get("git_sha") == git_sha()
        and not verify_manifest(phase_dir)
    )
