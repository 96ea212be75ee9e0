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
    # Airflow's run ids: ':' and '+' escaped as ~<hex>, the rest kept readable
    assert (
        safe_component("manual__2026-01-01T00:00:00+00:00")
        == "manual__2026-01-01T00~3a00~3a00~2b00~3a00"
    )
    # plain names are their own folders (dag ids, variants, hand-chosen run ids)
    for plain in ("bem_fleet", "r1", "a_b", "v1.2=x-y", "a."):
        assert safe_component(plain) == plain
    # the collision, and the ones around it, are gone
    assert safe_component("a:b") == "a~3ab" != safe_component("a_b")
    assert safe_component("a~b") == "a~7eb" != safe_component("a~7eb") == "a~7e7eb"
    assert safe_component("é") == "~c3~a9"
    # never hidden (retention and manifests skip dot names) and never a path step
    assert (safe_component("."), safe_component(".."), safe_component(".x")) == (
        "~2e", "~2e.", "~2ex"
    )  # fmt: skip
    assert safe_component("a/b") == "a~2fb"
    with pytest.raises(ValueError, match="empty name"):
        safe_component("")
    with pytest.raises(ValueError, match="more than the file-name limit of 255"):
        safe_component(":" * 100)


def _names(alphabet: str, max_len: int) -> list[str]:
    from itertools import product

    return ["".join(t) for n in range(1, max_len + 1) for t in product(alphabet, repeat=n)]


def test_safe_component_is_injective_and_inverted_by_component_name() -> None:
    """Every string up to length 4 over an alphabet of plain, escaped and escape-like
    characters (7,380 names), plus 20,000 random ones: distinct names, distinct folders."""
    import random

    from bem_tasks.fleet.runs import component_name

    names = _names("a_:~7.é+/", 4)
    rng = random.Random(0)
    pool = "ab_-.=:+~/ 7eé\U0001f600T0"
    names += ["".join(rng.choices(pool, k=rng.randint(1, 40))) for _ in range(20_000)]
    names = list(dict.fromkeys(names))
    folders = [safe_component(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all(component_name(f) == n for f, n in zip(folders, names, strict=True))
    assert all(not f.startswith(".") and "/" not in f for f in folders)
    # folders the rule never makes (older or hand-made) are shown as they are
    assert component_name("manual__2026-01-01T00_00_00") == "manual__2026-01-01T00_00_00"
    assert component_name("x~zz") == "x~zz"


def test_claiming_a_run_folder_twice_with_one_run_id_is_fine(tmp_path: Path) -> None:
    from bem_tasks.fleet.runs import RUN_ID_MARKER, RunLayout

    layout = RunLayout(tmp_path, "bem_fleet", "manual__2026-01-01T00:00:00+00:00")
    assert layout.claim() == layout.run_dir == layout.claim()
    assert (layout.run_dir / RUN_ID_MARKER).read_text() == layout.run_id
    assert [p.name for p in layout.run_dir.iterdir()] == [RUN_ID_MARKER]  # no temp files left


class _OneFolder:
    """A RunLayout whose run id does not choose its folder: every run id claims ``shared``."""

    def __init__(self, root: Path, run_id: str) -> None:
        from bem_tasks.fleet.runs import RunLayout

        class Shared(RunLayout):
            @property
            def run_dir(self) -> Path:
                return self.artifact_root / "shared"

        self.layout = Shared(root, "d", run_id)


def _claim(args: tuple[str, str]) -> str:
    from bem_tasks.fleet.runs import RunFolderClaimed

    root, run_id = args
    try:
        _OneFolder(Path(root), run_id).layout.claim()
    except RunFolderClaimed:
        return "refused"
    return "claimed"


def test_concurrent_claims_of_one_folder_by_other_run_ids_let_exactly_one_in(
    tmp_path: Path,
) -> None:
    """The marker check, raced: 8 processes, 8 run ids, one folder (as two run ids would share
    one under a naming collision): one claims it, seven are refused; repeated 5 times."""
    import multiprocessing as mp

    from bem_tasks.fleet.runs import RUN_ID_MARKER

    with mp.get_context("fork").Pool(8) as pool:
        for attempt in range(5):
            root = tmp_path / str(attempt)
            outcome = pool.map(_claim, [(str(root), f"run-{i}") for i in range(8)])
            assert sorted(outcome) == ["claimed"] + ["refused"] * 7
            owner = (root / "shared" / RUN_ID_MARKER).read_text()
            assert owner == f"run-{outcome.index('claimed')}"


def _claim_real(args: tuple[str, str]) -> str:
    from bem_tasks.fleet.runs import RunLayout

    root, run_id = args
    return str(RunLayout(Path(root), "bem_fleet", run_id).claim())


def test_concurrent_runs_whose_ids_collided_before_get_their_own_folders(tmp_path: Path) -> None:
    """Run ids that all cleaned to ``a_b`` under the old rule, claimed at once: eight folders,
    each marked with its own run id."""
    import multiprocessing as mp

    from bem_tasks.fleet.runs import RUN_ID_MARKER

    ids = ["a_b", "a:b", "a+b", "a b", "a/b", "a::b", "a_b.", "_a_b"]
    with mp.get_context("fork").Pool(8) as pool:
        folders = pool.map(_claim_real, [(str(tmp_path), i) for i in ids])
    assert len(set(folders)) == len(ids)
    assert [(Path(f) / RUN_ID_MARKER).read_text() for f in folders] == ids


def test_verify_manifest_reports_a_malformed_files_entry(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "hello")
    write_manifest(tmp_path, config_hash="abc", seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"]["a.txt"] = "2cf24d"
    atomic_write_json(tmp_path / "manifest.json", manifest)
    assert verify_manifest(tmp_path) == [
        f"{tmp_path / 'manifest.json'}:files.a.txt: expected {{sha256: <hex>, bytes: <int>}}"
    ]
    atomic_write_json(tmp_path / "manifest.json", {**manifest, "files": ["a.txt"]})
    assert verify_manifest(tmp_path) == [
        f"{tmp_path / 'manifest.json'}:files: expected a mapping of file -> {{sha256, bytes}}"
    ]
