"""Artifact layout and manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bem_tasks.fleet.runs import is_complete, safe_component, verify_manifest, write_manifest
from bem_tasks.io import atomic_write_json, atomic_write_text, sha256_file


def test_manifest_hashes_every_file_and_detects_changes(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": 1})
    write_manifest(tmp_path, config_hash="abc", seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # sha256("hello")
    assert manifest["files"]["a.txt"]["sha256"] == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert manifest["files"]["sub/b.json"]["sha256"] == sha256_file(tmp_path / "sub" / "b.json")
    assert is_complete(tmp_path, "abc", 0)
    assert not is_complete(tmp_path, "other-config", 0)
    assert not is_complete(tmp_path, "abc", 1)
    (tmp_path / "sub" / "b.json").unlink()
    assert verify_manifest(tmp_path) == [
        f"{tmp_path / 'sub' / 'b.json'}: listed in the manifest but missing"
    ]


def test_atomic_write_leaves_no_temp_files_and_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})

    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"v": Boom()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_safe_component() -> None:
    assert (
        safe_component("manual__2026-01-01T00:00:00+00:00") == "manual__2026-01-01T00_00_00_00_00"
    )
    with pytest.raises(ValueError):
        safe_component("///")
