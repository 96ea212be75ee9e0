"""Benjamini-Hochberg adjustment and power analysis: known answers and statsmodels equality."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from bem_tasks.stats import bh_adjust
from bem_tasks.stats.power import achieved_power, n_for_margin, required_n


def test_bh_equals_statsmodels_fdr_bh() -> None:
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 50):
        p = np.concatenate([rng.uniform(size=m - m // 3), rng.uniform(0, 0.01, size=m // 3)])
        rng.shuffle(p)
        np.testing.assert_array_equal(bh_adjust(p), multipletests(p, method="fdr_bh")[1])


def test_bh_is_monotone_where_the_naive_formula_is_not() -> None:
    p = np.array([0.041, 0.010, 0.040, 0.011])  # deliberately not sorted
    order = np.argsort(p)
    naive = p[order] * len(p) / np.arange(1, len(p) + 1)
    assert np.any(np.diff(naive) < 0)  # p*m/rank: 0.04, 0.022, 0.0533, 0.041
    adjusted = bh_adjust(p)
    np.testing.assert_allclose(adjusted, [0.041, 0.022, 0.041, 0.022])  # hand-computed, input order
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= p)


def test_bh_known_answer_and_cap_at_one() -> None:
    np.testing.assert_allclose(bh_adjust([0.01, 0.02, 0.03, 0.5]), [0.04, 0.04, 0.04, 0.5])
    assert bh_adjust([0.9, 0.99]).max() <= 1.0
    assert bh_adjust([]).shape == (0,)


@pytest.mark.parametrize(
    ("p", "match"),
    [
        ([0.1, float("nan")], "NaN or infinite"),
        ([0.1, 1.2], r"in \[0, 1\]"),
        ([[0.1, 0.2]], "1-D array"),
        (["x"], "array of numbers"),
    ],
)
def test_bh_rejects_bad_input(p: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bh_adjust(p)  # type: ignore[arg-type]


def test_required_n_known_answers() -> None:
    # Paired t-test, two-sided alpha 0.05, power 0.8: d=0.5 needs 34 pairs (as G*Power).
    assert required_n(0.5) == 34
    assert achieved_power(0.5, 34) == pytest.approx(0.8078, abs=1e-4)
    assert achieved_power(0.5, 33) < 0.8 <= achieved_power(0.5, 34)
    assert required_n(-0.5) == 34  # the sign of the effect does not matter two-sided
    for d in (0.05, 0.2, 1.3, 4.0, 20.0):
        n = required_n(d, power=0.9, alpha=0.01)
        assert achieved_power(d, n, 0.01) >= 0.9
        assert n == 2 or achieved_power(d, n - 1, 0.01) < 0.9


def test_n_for_margin_is_required_n_at_margin_over_sd() -> None:
    assert n_for_margin(2.0, 1.0) == required_n(0.5) == 34
    assert n_for_margin(2.0, -1.0) == 34
    assert n_for_margin(0.1, 0.001) > n_for_margin(0.1, 0.01)


def test_power_bad_input() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        required_n(0.0)
    with pytest.raises(ValueError, match="power must be in"):
        required_n(0.5, power=1.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        achieved_power(0.5, 10, alpha=0.0)
    with pytest.raises(ValueError, match="n must be at least 2"):
        achieved_power(0.5, 1)
    with pytest.raises(ValueError, match="sd must be positive"):
        n_for_margin(0.0, 1.0)
