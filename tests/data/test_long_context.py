from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.data import SUITES, DataFileError, check_disjoint
from bem_tasks.data.suites.long_context import (
    FILLER,
    generate_long_context,
    read_long_context,
)

KW: dict[str, Any] = {
    "train_lengths": (400,),
    "eval_lengths": (600, 1500),
    "depths": (0.0, 0.3, 0.7, 1.0),
    "n_train_per_cell": 3,
    "n_dev_per_cell": 1,
    "n_test_per_cell": 2,
}
SLACK = max(len(s) for s in FILLER) + 1  # a needle snaps to the nearest sentence boundary


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    paths = generate_long_context(tmp_path_factory.mktemp("e"), seed=0, **KW)
    return {name: read_long_context(p) for name, p in paths.items()}


def test_cells_and_lengths(rows: dict[str, list]) -> None:
    assert len(rows["train"]) == 1 * 4 * 2 * 3
    assert len(rows["test"]) == 2 * 4 * 2 * 2
    for it in rows["test"]:
        assert it.length - SLACK <= len(it.context) <= it.length
        assert it.prompt == f"{it.context}\n{it.question}\n" and it.target == it.answer


def test_needles_sit_at_their_depth(rows: dict[str, list]) -> None:
    for it in rows["train"] + rows["test"]:
        for n in it.needles:
            assert it.context[n.offset : n.offset + len(n.text)] == n.text
            # position within the filler alone: remove the needles placed before this one
            before = sum(len(m.text) + 1 for m in it.needles if m.offset < n.offset)
            filler_pos = n.offset - before
            assert abs(filler_pos - n.depth * it.filler_length) <= SLACK
        role = "link" if it.kind == "multihop" else "target"
        (main,) = [n for n in it.needles if n.role == role]
        assert main.depth == it.depth
        before = sum(len(m.text) + 1 for m in it.needles if m.offset < main.offset)
        if it.depth == 0.0:
            assert main.offset - before == 0  # very start of the filler
        if it.depth == 1.0:
            assert main.offset - before == it.filler_length + 1  # after the last sentence


def test_answers_follow_the_needles_in_the_text(rows: dict[str, list]) -> None:
    for it in rows["train"] + rows["test"]:
        codes = dict(re.findall(r"The code for (k\d+) is (\d{4})\.", it.context))
        asked = re.findall(r"k\d+", it.question)[0]
        if it.kind == "single":
            assert it.answer == codes[asked]
        else:
            (dst,) = re.findall(rf"\b{asked} points to (k\d+)\.", it.context)
            assert it.answer == codes[dst]
            assert asked not in codes  # no code for the first hop: it must be followed
        assert len(codes) == (1 + 2)  # target + 2 distractors, all distinct keys


def test_disjoint_deterministic_and_validated(rows: dict[str, list], tmp_path: Path) -> None:
    check_disjoint(rows)
    a = generate_long_context(tmp_path / "a", seed=0, **KW)
    b = generate_long_context(tmp_path / "b", seed=0, **KW)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    row = json.loads(a["dev"].read_text().splitlines()[0])
    row["needles"][0]["offset"] += 1
    bad = tmp_path / "dev.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFileError, match=r"dev\.jsonl:1: needles: .*not at offset"):
        read_long_context(bad)
    assert SUITES["long_context"].read is read_long_context
