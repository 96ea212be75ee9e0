from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bem_tasks.data import SUITES, check_disjoint, get_suite

SMALL: dict[str, dict[str, Any]] = {
    "compositional": {"n_train": 10, "n_dev": 2, "n_test": 2},
    "feedback_stream": {"n_stream": 10, "inject_at": 5, "n_probe": 2, "n_heldout": 2},
    "safety": {"n_train": 10, "n_dev": 2, "n_test": 2},
    "scramble": {"n_train": 10, "n_dev": 2, "n_test": 2, "n_ood": 2},
    "long_context": {"train_lengths": (300,), "eval_lengths": (500,), "depths": (0.5,),
                     "n_train_per_cell": 1, "n_dev_per_cell": 1, "n_test_per_cell": 1},
}  # fmt: skip


def test_every_suite_generates_and_reads_back(tmp_path: Path) -> None:
    assert sorted(s.mission for s in SUITES.values()) == ["A", "B", "C", "D", "E"]
    for name, kwargs in SMALL.items():
        suite = get_suite(name)
        paths = suite.generate(tmp_path / name, seed=0, **kwargs)
        rows = {split: suite.read(p) for split, p in paths.items()}
        assert all(p.name == f"{split}.jsonl" for split, p in paths.items())
        assert all(isinstance(r, suite.row) for rs in rows.values() for r in rs)
        check_disjoint(rows)


def test_unknown_suite_is_named() -> None:
    with pytest.raises(KeyError, match="unknown suite 'nope'; expected one of .*compositional"):
        get_suite("nope")
