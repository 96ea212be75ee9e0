from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.data import SUITES, DataFileError, check_disjoint, region_of
from bem_tasks.data.suites.compositional import (
    SALT,
    extract_answer,
    generate_compositional,
    make_item,
    read_compositional,
    skill_per_char,
)

SIZES: dict[str, Any] = {"n_train": 120, "n_dev": 20, "n_test": 30}


def expected(op: str, values: list[int]) -> int | list[int]:
    # an independent restatement of the task, not a call into the generator
    if op == "copy":
        return values[0]
    if op == "sort":
        return sorted(values)
    a, b = values
    return {"add": a + b, "sub": a - b, "max": max(a, b), "min": min(a, b)}[op]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_compositional(tmp_path_factory.mktemp("a"), seed=3, **SIZES)


def test_same_seed_gives_identical_bytes(files: dict[str, Path], tmp_path: Path) -> None:
    again = generate_compositional(tmp_path / "again", seed=3, **SIZES)
    for split, path in files.items():
        assert again[split].read_bytes() == path.read_bytes()
    other = generate_compositional(tmp_path / "other", seed=4, **SIZES)
    assert other["train"].read_bytes() != files["train"].read_bytes()


def test_splits_are_disjoint_and_in_their_hash_region(files: dict[str, Path], tmp_path: Path):
    rows = {split: read_compositional(p) for split, p in files.items()}
    assert {s: len(r) for s, r in rows.items()} == {"train": 120, "dev": 20, "test": 30}
    check_disjoint(rows)
    for split, items in rows.items():
        assert all(it.split == split and region_of(it.key, salt=SALT) == split for it in items)
    # a different seed's test set never meets this seed's training set
    other = read_compositional(generate_compositional(tmp_path, seed=99, **SIZES)["test"])
    check_disjoint({"train": rows["train"], "test": other})


def test_plans_tile_the_target_and_answers_are_right(files: dict[str, Path]) -> None:
    for it in read_compositional(files["train"]):
        assert 1 <= len(it.plan) <= 3
        assert it.plan[0].start == 0 and it.plan[-1].end == len(it.target)
        for prev, nxt in zip(it.plan, it.plan[1:], strict=False):
            assert prev.end == nxt.start
        segs = {s.skill: it.target[s.start : s.end] for s in it.plan}
        values = [it.facts[k] for k in it.args]
        # the facts are really in the prompt's context
        for k in it.args:
            assert f"{k}={it.facts[k]}" in it.prompt.split("|")[0].split(";")
        gold = expected(it.op, values)
        assert json.loads(it.answer) == gold and it.answer == json.dumps(gold).replace(" ", "")
        assert segs["retrieve"] == "R:" + ",".join(map(str, values)) + ";"
        assert json.loads(segs["formalize"][2:]) == {"answer": gold}
        if it.op == "copy":
            assert [s.skill for s in it.plan] == ["retrieve", "formalize"]
        else:
            assert segs["reason"] == f"C:{it.answer};"
        assert extract_answer(it.target) == it.answer
        assert it.prompt.endswith(f"|{it.question}\n")


def test_extract_answer_is_strict_about_the_convention() -> None:
    assert extract_answer('R:1,2;C:3;F:{"answer":3}') == "3"
    assert extract_answer('F:{"answer":-4} trailing') == "-4"
    assert extract_answer('F:{"result":3}') is None
    assert extract_answer('F:{"result":3}', "result") == "3"
    assert extract_answer("C:3;F:{answer") is None
    assert extract_answer("no segment") is None


def test_bad_rows_name_file_line_and_field(files: dict[str, Path], tmp_path: Path) -> None:
    lines = files["dev"].read_text().splitlines()
    row = json.loads(lines[4])
    row["answer"] = str(int(row["answer"]) + 1)
    lines[4] = json.dumps(row)
    bad = tmp_path / "dev.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"dev\.jsonl:5: answer: Value error, expected"):
        read_compositional(bad)
    row = json.loads(files["dev"].read_text().splitlines()[0])
    row["plan"][1]["start"] += 1
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFileError, match=r"dev\.jsonl:1: plan: .*tile the target"):
        read_compositional(bad)


def test_item_construction_and_config_checks(tmp_path: Path) -> None:
    it = make_item({"k3": 17, "k9": 4, "k1": 8}, "add", ["k3", "k9"], split="x")
    assert it.prompt == "k3=17;k9=4;k1=8|add k3 k9\n"
    assert it.target == 'R:17,4;C:21;F:{"answer":21}'
    assert [(s.skill, s.start, s.end) for s in it.plan] == [
        ("retrieve", 0, 7),
        ("reason", 7, 12),
        ("formalize", 12, 27),
    ]
    assert skill_per_char(it.target, it.plan) == [0] * 7 + [1] * 5 + [2] * 15
    with pytest.raises(ValueError, match="max_facts <= n_keys"):
        generate_compositional(tmp_path, max_facts=20, n_keys=10)
    with pytest.raises(ValueError, match="at least 1 row"):
        generate_compositional(tmp_path, n_dev=0)
    assert SUITES["compositional"].mission == "A"
