"""LastGood's rollback log: appended once per step (a retried task does not count twice), read
back with file:line errors, bounded in memory with a total count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bem_tasks.missions.living import LastGood, Rollback, Trip, read_rollback_log

CANARY = Trip("canary_pass_rate", 0.5, 0.9, bound="min")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _logged(path: Path) -> list[Rollback]:
    return [r for _, r in read_rollback_log(path / "rollbacks.jsonl")]


def test_each_rollback_appends_one_line_and_a_retry_does_not_count_twice(tmp_path: Path) -> None:
    model = _model()
    good = LastGood(tmp_path, trainable_only=True)
    good.mark(0, model)
    nan = Trip("kl", float("nan"), 0.1)  # a NaN reading trips and must be loggable
    first = good.rollback(3, [CANARY], model)
    second = good.rollback(7, [nan], model)
    lines = (tmp_path / "rollbacks.jsonl").read_text().splitlines()
    assert len(lines) == 2 and good.total == 2 and good.rollbacks == [first, second]
    assert _logged(tmp_path)[0] == first and _logged(tmp_path)[1].tripped[0].monitor == "kl"

    # a retried task resumes from a checkpoint before step 7 and rolls back there again
    retried = LastGood(tmp_path, trainable_only=True, keep_in_memory=1)
    assert retried.total == 2 and [r.at_step for r in retried.rollbacks] == [7]
    retried.rollback(3, [CANARY], model)  # older than the one kept in memory: read from the file
    retried.rollback(7, [nan], model)
    assert retried.total == 2 and len(_logged(tmp_path)) == 2
    retried.rollback(9, [CANARY], model)
    assert retried.total == 3 and [r.at_step for r in _logged(tmp_path)] == [3, 7, 9]


def test_memory_keeps_only_the_newest_rollbacks_but_counts_all(tmp_path: Path) -> None:
    model = _model()
    good = LastGood(tmp_path, trainable_only=True, keep_in_memory=5)
    good.mark(0, model)
    for step in range(1, 21):
        good.rollback(step, [CANARY], model)
    assert good.total == 20 and [r.at_step for r in good.rollbacks] == [16, 17, 18, 19, 20]
    assert len(_logged(tmp_path)) == 20
    reopened = LastGood(tmp_path, trainable_only=True, keep_in_memory=5)
    assert reopened.total == 20 and reopened.rollbacks == good.rollbacks
    with pytest.raises(ValueError, match="keep_in_memory must be >= 1"):
        LastGood(tmp_path, trainable_only=True, keep_in_memory=0)


def test_a_corrupt_line_names_file_and_line(tmp_path: Path) -> None:
    model = _model()
    good = LastGood(tmp_path, trainable_only=True)
    good.mark(0, model)
    good.rollback(1, [CANARY], model)
    good.rollback(2, [CANARY], model)
    log = tmp_path / "rollbacks.jsonl"
    lines = log.read_text().splitlines()
    for bad in ('{"at_step": 2, "restored', '{"at_step": 2}', '{"at_step": "2", '
                '"restored_step": 0, "tripped": []}', "[1, 2]"):  # fmt: skip
        log.write_text(f"{lines[0]}\n{bad}\n")
        with pytest.raises(ValueError, match=r"rollbacks\.jsonl:2: not a rollback record"):
            LastGood(tmp_path, trainable_only=True)


def test_an_append_cut_short_by_a_crash_is_dropped_and_redone(tmp_path: Path) -> None:
    model = _model()
    good = LastGood(tmp_path, trainable_only=True)
    good.mark(0, model)
    good.rollback(1, [CANARY], model)
    log = tmp_path / "rollbacks.jsonl"
    whole = log.read_text()
    log.write_text(whole + whole[:20])  # the crash hit the append of the rollback at step 2
    assert [r.at_step for r in _logged(tmp_path)] == [1]  # a reader skips the fragment
    retried = LastGood(tmp_path, trainable_only=True)
    assert retried.total == 1 and log.read_text() == whole
    retried.rollback(2, [CANARY], model)
    assert [r.at_step for r in _logged(tmp_path)] == [1, 2]
