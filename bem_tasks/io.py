"""Atomic file writes and hashing: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a folder so that it is never visible half-deleted: it first leaves its name by an
    atomic rename to a hidden ``.trash-<name>-<ns>`` beside it, then that is deleted. A crash in
    between leaves only the hidden folder (names starting with '.' are never read as results),
    which ``clear_trash`` (here, and where a checkpoint folder is opened) deletes later."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
    clear_trash(path)


def clear_trash(path: str | os.PathLike[str]) -> None:
    """Delete what an interrupted ``remove_tree(path)`` left beside ``path`` (its hidden
    ``.trash-<name>-<ns>`` folders)."""
    path = Path(path)
    for left in path.parent.glob(f".trash-{glob.escape(path.name)}-[0-9]*"):
        shutil.rmtree(left, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    )


def utc_now() -> str:
    """``2026-11-26T12:00:00.123456+00:00``: sortable, precise enough to order events."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def file_digests(
    directory: Path, *, skip: Callable[[Path], bool] = lambda p: False
) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``directory`` not skipped."""
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not skip(p)
    }


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
