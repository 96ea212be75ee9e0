"""Mission A scores answers exactly (issue 9, point 1): sign kept, typed, F1 over list elements."""

from __future__ import annotations

import json

import pytest

from bem_tasks.data.suites.compositional import extract_answer
from bem_tasks.eval import answer_em_f1, read_records
from bem_tasks.missions import mission_a
from tests.missions.conftest import MicroRun


def test_a_sign_flip_scores_zero_against_negative_gold() -> None:
    assert mission_a._answer_scores('R:2,5;C:-3;F:{"answer":-3}', "-3") == (100.0, 100.0, True)
    assert mission_a._answer_scores('R:2,5;C:-3;F:{"answer":3}', "-3") == (0.0, 0.0, True)
    assert mission_a._answer_scores('R:5,2;C:3;F:{"answer":-3}', "3") == (0.0, 0.0, True)
    assert mission_a._answer_scores('F:{"answer":"-3"}', "-3") == (0.0, 0.0, True)
    assert mission_a._answer_scores("R:2,5;C:-3;", "-3") == (0.0, 0.0, False)


def test_a_list_answer_gets_partial_f1_and_no_em() -> None:
    em, f1, valid = mission_a._answer_scores('R:8,4,17;C:[4,8,17];F:{"answer":[4,8,7]}', "[4,8,17]")
    assert (em, valid) == (0.0, True) and f1 == pytest.approx(200 / 3)


def test_recorded_scores_are_the_exact_scores_of_the_outputs(micro: MicroRun) -> None:
    d = micro.dirs["evaluate"]
    outputs = [json.loads(line) for line in (d / "outputs.jsonl").open()]
    records = {
        (r.example_id, r.system): r.metrics
        for r in read_records(d / "records.jsonl")
        if "em" in r.metrics  # answer records (latency and KV records carry no answer)
    }
    assert len(records) == len(outputs) > 0
    for row in outputs:
        em, f1 = answer_em_f1(extract_answer(row["output"]), row["answer"])
        m = records[(row["id"], row["system"])]
        assert (m["em"], m["f1"]) == (em, f1)
