from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.data import DataFileError, check_disjoint, region_of
from bem_tasks.data.suites.compositional import SALT, extract_answer, read_compositional
from bem_tasks.data.suites.compositional import generate_compositional as gen_a
from bem_tasks.data.suites.feedback_stream import generate_feedback_stream, read_feedback_stream

KW: dict[str, Any] = {"n_stream": 300, "inject_at": 100, "n_probe": 40, "n_heldout": 40}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    paths = generate_feedback_stream(tmp_path_factory.mktemp("b"), seed=1, **KW)
    return {name: read_feedback_stream(p) for name, p in paths.items()}


def test_injection_starts_at_t0(parts: dict[str, list]) -> None:
    stream = parts["stream"]
    assert [it.t for it in stream] == list(range(300))
    assert all(it.variant == "base" for it in stream[:100])
    late = [it.variant for it in stream[100:]]
    assert 0.3 < late.count("result_key") / len(late) < 0.7  # variant_rate 0.5
    assert all(it.variant == "result_key" and it.t is None for it in parts["probe"])
    assert all(it.variant == "base" and it.t is None for it in parts["heldout"])


def test_variant_breaks_the_old_convention(parts: dict[str, list]) -> None:
    for it in parts["probe"]:
        assert it.question.endswith(" as result") and it.answer_field == "result"
        assert extract_answer(it.target, "result") == it.answer
        assert extract_answer(it.target) is None  # an old-convention reader scores it wrong
        old = it.target.replace('"result"', '"answer"')
        assert extract_answer(old, "result") is None  # and old-convention output is wrong


def test_reversed_variant_recomputes(tmp_path: Path) -> None:
    paths = generate_feedback_stream(tmp_path, seed=2, variant="reversed_op", **KW)
    probe = read_feedback_stream(paths["probe"])
    for it in probe:
        values = [it.facts[k] for k in it.args]
        if it.op == "sort":
            want: object = sorted(values, reverse=True)
        else:
            a, b = values
            want = {"sub": b - a, "max": min(a, b), "min": max(a, b)}[it.op]
        assert json.loads(it.answer) == want and it.question.endswith(" reversed")


def test_held_out_sets_never_meet_the_stream(parts: dict[str, list], tmp_path: Path) -> None:
    check_disjoint(parts)
    assert all(region_of(it.key, salt=SALT) == "train" for it in parts["stream"])
    assert all(region_of(it.key, salt=SALT) == "test" for it in parts["probe"] + parts["heldout"])
    # nor Suite A's training split (same hash regions)
    a_train = read_compositional(gen_a(tmp_path, seed=5, n_train=300, n_dev=5, n_test=5)["train"])
    check_disjoint({"a_train": a_train, "heldout": parts["heldout"], "probe": parts["probe"]})


def test_determinism_and_validation(tmp_path: Path) -> None:
    a = generate_feedback_stream(tmp_path / "a", seed=1, **KW)
    b = generate_feedback_stream(tmp_path / "b", seed=1, **KW)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    row = json.loads(a["probe"].read_text().splitlines()[0])
    row["variant"] = "base"
    bad = tmp_path / "probe.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFileError, match=r"probe\.jsonl:1: variant: .*does not follow"):
        read_feedback_stream(bad)
    with pytest.raises(ValueError, match="inject_at < n_stream"):
        generate_feedback_stream(tmp_path, n_stream=10, inject_at=10)
    with pytest.raises(ValueError, match="unknown variant"):
        generate_feedback_stream(tmp_path, variant="nope")
