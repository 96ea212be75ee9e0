"""`bem-fleet backup` / `restore`: a round trip restores every promoted run byte for byte, and a
tampered backup is refused, naming the file, before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bem_tasks.cli import main
from bem_tasks.fleet.runs import RunLayout, verify_manifest, write_manifest
from bem_tasks.io import atomic_write_json

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "bem_fleet_architecture.yml")


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An artifact root with one promoted run and one that was not."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(root))
    for run in ("promoted", "rejected"):
        d = RunLayout(root, "bem_fleet", run).phase_dir("mission_a", "evaluate", 0)
        d.mkdir(parents=True)
        (d / "weights.safetensors").write_bytes(run.encode() * 100)
        write_manifest(d, config_hash="h", seed=0)
    entry = {"run_id": "promoted", "model_path": str(root / "bem_fleet/promoted/mission_a")}
    atomic_write_json(
        root / "registry.json",
        {"version": 1, "missions": {"mission_a": {"current": entry, "history": [entry]}}},
    )
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_round_trip_restores_the_registry_promoted_runs_and_configs(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(fleet)
    assert main(["backup", "--to", str(tmp_path / "bk"), "--config", CONFIG]) == 0
    manifest = json.loads((tmp_path / "bk/backup_manifest.json").read_text())
    assert "artifacts/registry.json" in manifest["files"]
    assert "configs/configs/gates_bem2.yaml" in manifest["files"]
    assert "configs/experiments/mission_a_agentic_planner.yml" in manifest["files"]
    assert not any("rejected" in k for k in manifest["files"]), "only promoted runs"

    code = main(
        ["restore", "--from", str(tmp_path / "bk"), "--configs-to", str(tmp_path / "cfg"),
         "--config", CONFIG]
    )  # fmt: skip
    # into the unchanged root every artifact is already identical: only the configs are written
    n_configs = sum(k.startswith("configs/") for k in manifest["files"])
    assert code == 0 and f"wrote {n_configs} " in capsys.readouterr().out
    shutil.rmtree(fleet)  # the artifact root is lost
    assert main(["restore", "--from", str(tmp_path / "bk"), "--config", CONFIG]) == 0
    after = _files(fleet)
    kept = {k: v for k, v in before.items() if "rejected" not in k}
    assert {k: v for k, v in after.items() if not k.startswith("configs/")} == kept
    assert verify_manifest(fleet / "bem_fleet/promoted/mission_a/evaluate/seed_0") == []
    gates = Path(CONFIG).parent / "gates_bem2.yaml"
    assert (fleet / "configs/configs/gates_bem2.yaml").read_bytes() == gates.read_bytes()
    assert (tmp_path / "cfg/experiments/mission_a_agentic_planner.yml").is_file()


def test_a_writers_scratch_is_left_out_of_the_backup(fleet: Path, tmp_path: Path) -> None:
    run = fleet / "bem_fleet/promoted/mission_a/evaluate/seed_0"
    scratch = [
        ".phase.lock",
        ".metrics.json.k3j2x.tmp",
        ".run_id.8f2a.tmp",
        "checkpoints/.tmp-step-5-ab12/model.safetensors",
        "checkpoints/.old-step-4-zz01/model.safetensors",
        ".trash-checkpoints-1733000000/step-3/model.safetensors",
    ]
    for rel in scratch:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"partial")
    (run / "checkpoints/step-6").mkdir(parents=True)
    (run / "checkpoints/step-6/model.safetensors").write_bytes(b"kept")
    assert main(["backup", "--to", str(tmp_path / "bk"), "--config", CONFIG]) == 0
    files = json.loads((tmp_path / "bk/backup_manifest.json").read_text())["files"]
    prefix = "artifacts/bem_fleet/promoted/mission_a/evaluate/seed_0/"
    assert prefix + "checkpoints/step-6/model.safetensors" in files
    assert prefix + "weights.safetensors" in files
    assert [k for k in files if any(k == prefix + rel for rel in scratch)] == []


def test_a_tampered_backup_is_refused_naming_the_file_and_nothing_is_written(
    fleet: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["backup", "--to", str(tmp_path / "bk"), "--config", CONFIG]) == 0
    weights = next((tmp_path / "bk").rglob("weights.safetensors"))
    weights.write_bytes(b"evil" * 100)
    target = tmp_path / "new_root"
    args = ["restore", "--from", str(tmp_path / "bk"), "--configs-to", str(tmp_path / "c")]
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(target))
    assert main([*args, "--config", CONFIG]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "sha256 differs" in err
    assert not target.exists() and not (tmp_path / "c").exists()

    weights.write_bytes(b"promoted" * 100)  # repaired; now an unlisted file sneaks in
    (weights.parent / "extra.py").write_text("import os")
    assert main([*args, "--config", CONFIG]) == 2
    assert "extra.py: not listed" in capsys.readouterr().err
    assert not target.exists()


def test_restore_never_overwrites_a_different_file_unless_told(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup", "--to", str(tmp_path / "bk"), "--config", CONFIG]) == 0
    registry = fleet / "registry.json"
    registry.write_text('{"version": 1, "missions": {}}')
    args = ["restore", "--from", str(tmp_path / "bk"), "--configs-to", str(tmp_path / "c")]
    assert main([*args, "--config", CONFIG]) == 2
    assert f"{registry}: exists and differs" in capsys.readouterr().err
    assert json.loads(registry.read_text())["missions"] == {}
    assert main([*args, "--overwrite", "--config", CONFIG]) == 0
    assert "mission_a" in json.loads(registry.read_text())["missions"]


def test_backup_refuses_a_non_empty_destination(fleet: Path, tmp_path: Path) -> None:
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "x").write_text("x")
    assert main(["backup", "--to", str(tmp_path / "bk"), "--config", CONFIG]) == 2
