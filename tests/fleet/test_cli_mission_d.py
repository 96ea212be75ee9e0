"""`bem-fleet train mission_d --variants` and `evaluate --ood-suite`: bad names exit 2 naming the
option and the allowed values, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bem_tasks.cli import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "mission_d", "--phase", "pretrain", "--variants", "pt1,pt9"],
         "--variants 'pt1,pt9': expected a comma-separated subset of ['pt1', 'pt2', 'pt3', 'pt4']"),
        (["train", "mission_d", "--phase", "prepare", "--variants", "pt1"],
         "--variants: mission_d.prepare is not a mapped phase"),
        (["evaluate", "--mission", "mission_d", "--model", "M", "--ood-suite", "ood_x"],
         "--ood-suite 'ood_x': expected a comma-separated subset of ['ood_synonym', 'ood_entity', "
         "'ood_template']"),
        (["evaluate", "--mission", "mission_a", "--model", "M", "--ood-suite", "ood_entity"],
         "--ood-suite: only mission_d's ood_evaluation has OOD splits"),
    ],
)  # fmt: skip
def test_bad_variant_or_split_names_exit_2(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
