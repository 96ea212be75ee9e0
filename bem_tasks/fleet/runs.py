"""Run-scoped artifact layout and manifests.

Every phase writes under ``<artifact_root>/<dag_id>/<run_id>/<mission>/<phase>/[seed_<n>/]`` (a
mapped phase under ``<phase>/<variant>/seed_<n>/``, one folder and manifest per variant) and
finishes by writing ``manifest.json``: the sha256 of each file, the config hash, the seed, the git
SHA and the versions of the packages that produced it. A phase whose manifest is complete and
matches is not recomputed (tasks are idempotent: a rerun gives the same artifacts).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
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


_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._=-")
_ESCAPE = "~"  # never kept as itself, so an escape cannot be confused with plain characters
_MAX_NAME_BYTES = 255  # the usual file-name limit (ext4, xfs, APFS)
RUN_ID_MARKER = ".run_id"


def safe_component(name: str) -> str:
    """A folder name for ``name``: plain characters kept, every other byte (and a leading '.')
    written as ``~xx`` (its hex). Injective, so two run ids never share a folder (Airflow's
    ``manual__2026-01-01T00:00:00+00:00`` -> ``manual__2026-01-01T00~3a00~3a00~2b00~3a00``);
    a name of plain characters only is its own folder name. ``component_name`` inverts it."""
    if not name:
        raise ValueError("cannot make a folder name out of an empty name")
    parts = []
    for i, ch in enumerate(name):
        if ch in _PLAIN and not (i == 0 and ch == "."):
            parts.append(ch)
        else:
            parts.extend(f"{_ESCAPE}{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    folder = "".join(parts)
    if len(folder) > _MAX_NAME_BYTES:
        raise ValueError(
            f"cannot make a folder name out of {name!r}: escaped it is {len(folder)} characters, "
            f"more than the file-name limit of {_MAX_NAME_BYTES}"
        )
    return folder


def component_name(folder: str) -> str:
    """The name ``safe_component`` made ``folder`` from; a folder name it could not have made
    (a hand-made or older folder) is returned as it is."""
    if _ESCAPE not in folder:
        return folder
    out = bytearray()
    i = 0
    while i < len(folder):
        if folder[i] == _ESCAPE:
            try:
                out.append(int(folder[i + 1 : i + 3], 16))
            except ValueError:
                return folder
            i += 3
        else:
            out.extend(folder[i].encode("utf-8"))
            i += 1
    try:
        return out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return folder


class RunFolderClaimed(RuntimeError):
    """A run folder already belongs to another run id."""


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

    def claim(self) -> Path:
        """Create the run folder with a marker holding the raw run id, or check the marker of
        the existing one: a folder marked with another run id is refused, never reused. The
        marker is linked into place whole (``os.link`` fails if it exists), so of two processes
        claiming at once exactly one writes it and the other reads the finished marker."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_ID_MARKER
        if not marker.exists():
            fd, tmp = tempfile.mkstemp(prefix=f"{RUN_ID_MARKER}.", suffix=".tmp", dir=run_dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(self.run_id)
                os.link(tmp, marker)
            except FileExistsError:
                pass  # another process claimed it first: check its marker below
            finally:
                Path(tmp).unlink(missing_ok=True)
        owner = marker.read_text(encoding="utf-8")
        if owner != self.run_id:
            raise RunFolderClaimed(
                f"{marker}: the run folder {run_dir} belongs to run id {owner!r}, not "
                f"{self.run_id!r}; refusing to reuse another run's artifacts"
            )
        return run_dir


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
    path = phase_dir / MANIFEST
    if manifest is None:
        return [f"{path}: missing"]
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return [f"{path}:files: expected a mapping of file -> {{sha256, bytes}}"]
    problems = []
    for rel, info in files.items():
        file = phase_dir / rel
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            problems.append(f"{path}:files.{rel}: expected {{sha256: <hex>, bytes: <int>}}")
        elif not file.is_file():
            problems.append(f"{file}: listed in the manifest but missing")
        elif sha256_file(file) != info["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest")
    return problems


class InputMismatch(ValueError):
    """An earlier phase's folder does not match its manifest (changed, truncated, missing)."""


def require_intact(phase_dir: Path, who: str) -> None:
    """Raise unless ``phase_dir`` holds a manifest whose every listed file has its sha256.
    ``who`` names the reader in the message (e.g. ``mission_a.train_experts: input 'prepare'``).
    """
    problems = verify_manifest(phase_dir)
    if problems:
        raise InputMismatch(
            f"{who} at {phase_dir} does not match its manifest: {'; '.join(problems)}; rerun "
            "that phase (its task) to rebuild it"
        )


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
