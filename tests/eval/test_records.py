from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bem_tasks.data.jsonl import DataFileError
from bem_tasks.eval.records import (
    ExampleRecord,
    paired_differences,
    read_records,
    write_records,
)


def grid(system: str, scores: dict[tuple[str, int], float]) -> list[ExampleRecord]:
    return [
        ExampleRecord(ex, system, seed, {"em": v, "f1": v / 2}, ("hard",) if ex == "e2" else ())
        for (ex, seed), v in scores.items()
    ]


CAND = {("e1", 0): 100.0, ("e1", 1): 0.0, ("e2", 0): 100.0, ("e2", 1): 100.0, ("e3", 0): 0.0, ("e3", 1): 100.0}  # fmt: skip
BASE = {("e1", 0): 0.0, ("e1", 1): 0.0, ("e2", 0): 100.0, ("e2", 1): 0.0, ("e3", 0): 100.0, ("e3", 1): 100.0}  # fmt: skip


def test_roundtrip_is_exact_and_deterministic(tmp_path: Path) -> None:
    recs = grid("bem", CAND) + grid("base", BASE)
    a = write_records(tmp_path / "a.jsonl", recs)
    b = write_records(tmp_path / "b.jsonl", recs)
    assert a.read_bytes() == b.read_bytes()
    assert read_records(a) == recs


def test_paired_array_aligns_by_example_and_seed() -> None:
    # shuffled input order must not matter
    recs = grid("base", BASE)[::-1] + grid("bem", CAND)
    p = paired_differences(recs, metric="em", candidate="bem", baseline="base")
    assert p.example_ids == ["e1", "e2", "e3"]
    assert p.seeds == [0, 1]
    np.testing.assert_array_equal(p.diffs, [[100.0, 0.0], [0.0, 100.0], [-100.0, 0.0]])
    assert p.diffs.shape == (3, 2)
    s = paired_differences(recs, metric="f1", candidate="bem", baseline="base", slice_tag="hard")
    assert s.example_ids == ["e2"]
    np.testing.assert_array_equal(s.diffs, [[0.0, 50.0]])


def test_missing_examples_fail_clearly() -> None:
    base = {k: v for k, v in BASE.items() if k != ("e3", 1)}
    recs = grid("bem", CAND) + grid("base", base)
    with pytest.raises(ValueError, match=r"baseline 'base' lacks 1 \(e\.g\. e3@seed1\)"):
        paired_differences(recs, metric="em", candidate="bem", baseline="base")
    # both sides consistent but not a full examples x seeds grid
    cand = {k: v for k, v in CAND.items() if k != ("e3", 1)}
    recs = grid("bem", cand) + grid("base", base)
    with pytest.raises(ValueError, match="not a full examples x seeds grid"):
        paired_differences(recs, metric="em", candidate="bem", baseline="base")
    with pytest.raises(ValueError, match="no records for system 'nope'"):
        paired_differences(recs, metric="em", candidate="nope", baseline="base")
    with pytest.raises(KeyError, match="no metric 'bleu'"):
        paired_differences(recs, metric="bleu", candidate="bem", baseline="base")


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = write_records(tmp_path / "r.jsonl", grid("bem", CAND))
    lines = path.read_text().splitlines()
    lines[2] = re.sub(r'"seed":\d+', '"seed":"one"', lines[2])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"r\.jsonl:3: seed: "):
        read_records(path)
    lines[2] = lines[1]  # duplicate of line 2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"r\.jsonl:3: duplicate record .*first on line 2"):
        read_records(path)
    path.write_text('{"example_id": "e1", "system": "s", "seed": 0, "metrics": {}}\n')
    with pytest.raises(DataFileError, match=r"r\.jsonl:1: metrics: .*at least one metric"):
        read_records(path)
    with pytest.raises(ValueError, match="not finite"):
        write_records(tmp_path / "n.jsonl", [ExampleRecord("e", "s", 0, {"em": float("nan")})])
