"""`bem-fleet backup` / `bem-fleet restore`: what a lost artifact root cannot recompute.

A backup holds the registry, every promoted run's mission folder (current and history entries;
without a writer's scratch: phase locks, temporary files, checkpoint staging folders) and the
configuration (architecture, gates and experiment files), each with its sha256 in
``backup_manifest.json``. Runs that were not promoted are left out: they can be rerun from the
configs. A backup is written beside its destination and renamed into place, so a half-written
one never exists under that name; a restore verifies every file against the manifest before it
writes anything, and never overwrites a different file unless told to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bem_tasks.config.loader import FleetConfig
from bem_tasks.fleet.retention import promoted_paths
from bem_tasks.io import atomic_write_bytes, atomic_write_json, sha256_file, utc_now

MANIFEST_NAME = "backup_manifest.json"
FORMAT = 1


class BackupError(ValueError):
    """A backup that cannot be written or restored; the message names the file."""


def _scratch(rel: Path) -> bool:
    """What a writer keeps only while it works: the phase lock, an atomic write's temporary
    file, a checkpoint's staging, replaced or trashed folder. A restore has no use for them."""
    name = rel.name
    return (
        name == ".phase.lock"
        or (name.startswith(".") and name.endswith(".tmp"))
        or any(part.startswith((".tmp-", ".old-", ".trash-")) for part in rel.parts)
    )


def _sources(cfg: FleetConfig) -> dict[str, Path]:
    """Backup-relative path -> source file."""
    root = cfg.artifact_root.resolve()
    files: dict[str, Path] = {}
    registry = root / "registry.json"
    if registry.is_file():
        files["artifacts/registry.json"] = registry
    for run in sorted(promoted_paths(registry)):
        if not run.is_dir():
            raise BackupError(f"{registry}: promoted run folder {run} is missing")
        try:
            rel = run.relative_to(root)
        except ValueError:
            raise BackupError(
                f"{registry}: promoted run {run} lies outside the artifact root {root}"
            ) from None
        for f in sorted(p for p in run.rglob("*") if p.is_file()):
            inside = f.relative_to(run)
            if not _scratch(inside):
                files[f"artifacts/{rel}/{inside}"] = f
    project = cfg.root.resolve()
    configs = [cfg.path, cfg.resolve(cfg.arch.statistics.gates)]
    configs += [cfg.resolve(m.experiment) for m in cfg.arch.missions.values()]
    for f in configs:
        f = f.resolve()
        rel = f.relative_to(project) if f.is_relative_to(project) else Path(f.name)
        files[f"configs/{rel}"] = f
    return files


def backup(cfg: FleetConfig, dest: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    """Copy the registry, the promoted runs and the configs to ``dest`` (a new folder)."""
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"--to {dest}: exists and is not empty; choose a new folder")
    files = _sources(cfg)
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    entries: dict[str, dict[str, Any]] = {}
    for rel, src in files.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        entries[rel] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    manifest = {
        "format": FORMAT,
        "created_at": utc_now(),
        "artifact_root": str(cfg.artifact_root.resolve()),
        "files": entries,
    }
    atomic_write_json(staging / MANIFEST_NAME, manifest)
    if dest.exists():
        dest.rmdir()  # empty, checked above
    os.replace(staging, dest)
    total = sum(e["bytes"] for e in entries.values())
    say(f"backed up {len(entries)} files ({total} bytes) to {dest}")
    return manifest


def _verified(src: Path) -> dict[str, Any]:
    """The backup's manifest, after every file it lists has been checked."""
    path = src / MANIFEST_NAME
    if not path.is_file():
        raise BackupError(f"{path}: missing (not a bem-fleet backup?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BackupError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path}:format: expected {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BackupError(f"{path}:files: expected a mapping of path -> sha256")
    for rel, info in files.items():
        f = (src / rel).resolve()
        if not f.is_relative_to(src.resolve()) or rel.startswith("/"):
            raise BackupError(f"{path}:files: {rel!r} points outside the backup")
        if not f.is_file():
            raise BackupError(f"{f}: listed in {MANIFEST_NAME} but missing")
        if sha256_file(f) != info.get("sha256"):
            raise BackupError(f"{f}: sha256 differs from {MANIFEST_NAME} (tampered or corrupt)")
    listed = {(src / rel).resolve() for rel in files} | {path.resolve()}
    extra = [p for p in src.rglob("*") if p.is_file() and p.resolve() not in listed]
    if extra:
        raise BackupError(f"{extra[0]}: not listed in {MANIFEST_NAME} (tampered?)")
    return manifest


def restore(
    src: Path,
    *,
    artifact_root: Path,
    configs_to: Path,
    overwrite: bool,
    say: Callable[[str], None],
) -> int:
    """Verify the whole backup, then write its files; returns how many were written."""
    manifest = _verified(src.resolve())
    plan: list[tuple[Path, Path]] = []
    for rel in manifest["files"]:
        top, _, rest = rel.partition("/")
        target = (artifact_root if top == "artifacts" else configs_to) / rest
        source = src / rel
        if target.exists() and sha256_file(target) != sha256_file(source) and not overwrite:
            raise BackupError(
                f"{target}: exists and differs from the backup's {rel}; nothing was written "
                "(--overwrite replaces it)"
            )
        plan.append((source, target))
    written = 0
    for source, target in plan:
        if target.exists() and sha256_file(target) == sha256_file(source):
            continue
        atomic_write_bytes(target, source.read_bytes())
        written += 1
    say(
        f"verified {len(plan)} files from {src}; wrote {written} "
        f"(artifacts into {artifact_root}, configs into {configs_to})"
    )
    return written
