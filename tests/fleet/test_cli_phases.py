"""`bem-fleet train` / `evaluate` run phase functions without Airflow, inputs given explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bem_tasks.cli import main


@pytest.fixture
def arch(project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path / "locks"))
    return str(project / "configs" / "bem_fleet_architecture.yml")


def test_train_chain_with_checkpoint_then_evaluate(arch: str, tmp_path: Path, capsys) -> None:
    prep, fit, ev = tmp_path / "prep", tmp_path / "fit", tmp_path / "eval"
    assert (
        main(
            ["train", "mission_toy", "--phase", "prepare", "--output", str(prep), "--config", arch]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "mission_toy",
                "--phase",
                "fit",
                "--checkpoint",
                str(prep),
                "--output",
                str(fit),
                "--seed",
                "3",
                "--config",
                arch,
            ]
        )
        == 0
    )
    assert json.loads((fit / "model.json").read_text()) == {"mean": 4.5, "seed": 3}
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--mission",
                "mission_toy",
                "--model",
                str(fit),
                "--output",
                str(ev),
                "--seed",
                "3",
                "--config",
                arch,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"] == {"mean": 4.5, "seed": 3}
    assert (ev / "manifest.json").exists()


def test_inputs_from_a_run_folder(arch: str, tmp_path: Path) -> None:
    run = tmp_path / "run" / "mission_toy"
    main(
        [
            "train",
            "mission_toy",
            "--phase",
            "prepare",
            "--output",
            str(run / "prepare"),
            "--config",
            arch,
        ]
    )
    main(
        [
            "train",
            "mission_toy",
            "--phase",
            "fit",
            "--inputs-from",
            str(run),
            "--output",
            str(run / "fit" / "seed_0"),
            "--config",
            arch,
        ]
    )
    assert (
        main(
            [
                "evaluate",
                "--mission",
                "mission_toy",
                "--model",
                str(run / "fit" / "seed_0"),
                "--inputs-from",
                str(run),
                "--output",
                str(tmp_path / "e"),
                "--config",
                arch,
            ]
        )
        == 0
    )


def test_standalone_chain_finds_earlier_phases_beside_output(arch: str, tmp_path: Path) -> None:
    run = tmp_path / "standalone"
    for phase in ("prepare", "fit", "evaluate"):
        argv = ["train", "mission_toy", "--phase", phase, "--output", str(run / phase)]
        assert main([*argv, "--seed", "2", "--config", arch]) == 0, phase
    assert json.loads((run / "fit" / "model.json").read_text()) == {"mean": 4.5, "seed": 2}
    assert json.loads((run / "evaluate" / "metrics.json").read_text()) == {"mean": 4.5, "seed": 2}


def test_missing_inputs_and_unknown_phase_are_clear_errors(
    arch: str, tmp_path: Path, capsys
) -> None:
    assert (
        main(
            [
                "train",
                "mission_toy",
                "--phase",
                "fit",
                "--output",
                str(tmp_path / "f"),
                "--config",
                arch,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "needs the output of phase 'prepare'" in err
    assert f"bem-fleet train mission_toy --phase prepare --output {tmp_path / 'prepare'}" in err
    assert (
        main(
            [
                "train",
                "mission_toy",
                "--phase",
                "nope",
                "--output",
                str(tmp_path / "f"),
                "--config",
                arch,
            ]
        )
        == 2
    )
    assert "mission_toy has no phase 'nope'" in capsys.readouterr().err
