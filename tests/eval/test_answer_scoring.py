"""Exact, typed answer scoring (``answer_em_f1``): what Suite A's EM and F1 mean."""

from __future__ import annotations

import pytest

from bem_tasks.eval import answer_em_f1, em_f1_points


def test_sign_is_kept_and_numbers_compare_as_values() -> None:
    assert answer_em_f1("-3", "-3") == (100.0, 100.0)
    assert answer_em_f1("3", "-3") == (0.0, 0.0)  # negative gold, prediction differs by sign
    assert answer_em_f1("-3", "3") == (0.0, 0.0)
    assert answer_em_f1("3.0", "3") == (100.0, 100.0)  # the same number, written differently
    assert answer_em_f1("-0", "0") == (100.0, 100.0)
    # the SQuAD normaliser drops the minus sign: the bug this scoring replaces
    assert em_f1_points("-3", "3") == (100.0, 100.0)


def test_types_are_kept() -> None:
    assert answer_em_f1('"3"', "3") == (0.0, 0.0)  # a string is not a number
    assert answer_em_f1("true", "1") == (0.0, 0.0)  # nor is a boolean
    assert answer_em_f1("[3]", "3") == (0.0, 100.0)  # a list holding the number: F1 only
    assert answer_em_f1('{"a":1,"b":[2,3]}', '{"b":[2,3],"a":1}') == (100.0, 100.0)


def test_missing_or_unparsable_prediction_scores_zero() -> None:
    assert answer_em_f1(None, "3") == (0.0, 0.0)
    assert answer_em_f1("3 apples", "3") == (0.0, 0.0)
    assert answer_em_f1("", "[]") == (0.0, 0.0)
    assert answer_em_f1("[]", "[]") == (100.0, 100.0)
    assert answer_em_f1("[]", "[1]") == (0.0, 0.0)
    with pytest.raises(ValueError, match="gold answer 'x' is not JSON"):
        answer_em_f1("3", "x")


def test_list_f1_respects_order_and_differs_from_em() -> None:
    assert answer_em_f1("[4,8,17]", "[4,8,17]") == (100.0, 100.0)  # a correct sort
    # one wrong element of three: precision = recall = 2/3
    em, f1 = answer_em_f1("[4,8,16]", "[4,8,17]")
    assert em == 0.0 and f1 == pytest.approx(200 / 3)
    # the right values unsorted (a copy of the retrieve segment): the longest common
    # subsequence is 4,8 -> F1 2/3, not 100
    em, f1 = answer_em_f1("[17,4,8]", "[4,8,17]")
    assert em == 0.0 and f1 == pytest.approx(200 / 3)
    assert answer_em_f1("[8,4]", "[4,8]") == (0.0, 50.0)
    assert answer_em_f1("[17,8,4]", "[4,8,17]")[1] == pytest.approx(100 / 3)  # reversed
    # a missing element: precision 1, recall 2/3 -> F1 0.8 (later elements still match)
    em, f1 = answer_em_f1("[-4,8]", "[-4,8,17]")
    assert em == 0.0 and f1 == pytest.approx(80.0)
    em, f1 = answer_em_f1("[8,17]", "[4,8,17]")
    assert em == 0.0 and f1 == pytest.approx(80.0)
    # a repeated element counts once per occurrence in the gold
    em, f1 = answer_em_f1("[4,4]", "[4,8]")
    assert em == 0.0 and f1 == pytest.approx(50.0)
    # signs matter inside lists too
    em, f1 = answer_em_f1("[3,5]", "[-3,5]")
    assert em == 0.0 and f1 == pytest.approx(50.0)


def test_object_f1_ignores_key_order() -> None:
    assert answer_em_f1('{"b":2,"a":1}', '{"a":1,"b":2}') == (100.0, 100.0)
    assert answer_em_f1('{"a":1,"b":3}', '{"a":1,"b":2}') == (0.0, 50.0)


def test_an_integer_past_pythons_digit_limit_scores_zero() -> None:
    """json raises ValueError (not JSONDecodeError) for an integer literal over 4300 digits."""
    huge = "1" * 5000
    assert answer_em_f1(huge, "3") == (0.0, 0.0)
    assert answer_em_f1(f"[{huge},3]", "[3]") == (0.0, 0.0)


@pytest.mark.parametrize(("pred", "em"), [("-3", 100.0), ("3", 0.0), ("4", 0.0), ('"-3"', 0.0)])
def test_scalar_f1_equals_em(pred: str, em: float) -> None:
    assert answer_em_f1(pred, "-3") == (em, em)
