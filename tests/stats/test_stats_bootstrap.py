"""BCa bootstrap: equality with scipy, Monte Carlo agreement, p-values, clusters, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from bem_tasks.stats import bootstrap as bs
from bem_tasks.stats import paired_bca, paired_bootstrap


def _skewed(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 1.0, size=n) - 1.7


def _scipy_ci(
    d: np.ndarray, n_resamples: int, seed: int, conf: float = 0.95
) -> tuple[float, float]:
    res = sps.bootstrap(
        (d,), np.mean, n_resamples=n_resamples, rng=seed, method="BCa", confidence_level=conf
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_scipy_method_is_scipy_bootstrap(seed: int) -> None:
    d = _skewed(50, seed)
    assert paired_bca(d, n_resamples=3000, seed=seed, method="scipy") == _scipy_ci(d, 3000, seed)


@pytest.mark.parametrize(("seed", "conf"), [(0, 0.95), (5, 0.9), (42, 0.99)])
def test_fast_equals_scipy_when_draws_fit_one_chunk(seed: int, conf: float) -> None:
    d = _skewed(60, seed + 100)
    assert bs.CHUNK_ELEMENTS >= 60 * 4000  # one chunk: the very same draws as scipy
    fast = paired_bca(d, n_resamples=4000, seed=seed, confidence=conf)
    np.testing.assert_allclose(fast, _scipy_ci(d, 4000, seed, conf), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("statistic", ["mean", "median", "p95"])
@pytest.mark.parametrize("relative", [False, True])
def test_fast_equals_scipy_for_paired_ratio_and_quantile_statistics(
    statistic: str, relative: bool
) -> None:
    rng = np.random.default_rng(7)
    base = rng.lognormal(3.0, 0.5, size=80)
    cand = base * rng.lognormal(0.05, 0.2, size=80)
    kw = dict(statistic=statistic, relative=relative, n_resamples=2000, seed=4)
    fast = paired_bootstrap(cand, base, **kw)  # type: ignore[arg-type]
    ref = paired_bootstrap(cand, base, method="scipy", **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose([fast.low, fast.high], [ref.low, ref.high], rtol=1e-10)
    np.testing.assert_allclose(fast.p_value, ref.p_value, rtol=1e-8)
    np.testing.assert_allclose(fast.se, ref.se, rtol=1e-10)


def test_scipy_method_matches_a_direct_scipy_call_for_a_relative_change() -> None:
    rng = np.random.default_rng(8)
    base = rng.lognormal(3.0, 0.5, size=70)
    cand = base * rng.lognormal(0.1, 0.2, size=70)

    def ratio(c: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(c, axis=axis) / np.mean(b, axis=axis) - 1

    ref = sps.bootstrap((cand, base), ratio, paired=True, n_resamples=2000, rng=1, method="BCa")
    ours = paired_bootstrap(cand, base, relative=True, n_resamples=2000, seed=1, method="scipy")
    assert (ours.low, ours.high) == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert ours.estimate == pytest.approx(cand.mean() / base.mean() - 1, rel=1e-12)


def test_chunked_fast_path_agrees_with_scipy_within_monte_carlo_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small, odd-sized chunks and a different seed: certainly not scipy's draws. Measured over
    # 20 seed pairs, fast-minus-scipy endpoints have sd 0.068 bootstrap SE at B=5000, so about
    # 0.034 SE at B=20000: 0.25 SE is a 7-sigma bound.
    monkeypatch.setattr(bs, "CHUNK_ELEMENTS", 7 * 1000 + 3)
    d = _skewed(1000, 21)
    fast = paired_bootstrap(d, n_resamples=20_000, seed=123)
    lo, hi = _scipy_ci(d, 20_000, 456)
    assert abs(fast.low - lo) < 0.25 * fast.se
    assert abs(fast.high - hi) < 0.25 * fast.se
    # and the chunking really happened
    assert sum(1 for _ in bs.resample_counts(1000, 20_000, 0)) == -(-20_000 // 7)


def test_resample_counts_are_scipys_index_draws() -> None:
    n, b, seed = 30, 50, 9
    idx = np.random.default_rng(seed).integers(0, n, (b, n))
    expected = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    got = np.concatenate(list(bs.resample_counts(n, b, seed)))
    np.testing.assert_array_equal(got, expected)
    assert np.all(got.sum(axis=1) == n)


def test_leave_one_out_quantile_matches_brute_force() -> None:
    x = np.random.default_rng(2).normal(size=41)
    x[5] = x[6]  # ties
    for q in (0.05, 0.5, 0.95):
        brute = [np.quantile(np.delete(x, i), q) for i in range(x.size)]
        np.testing.assert_allclose(bs._loo_quantile(x, q), brute, rtol=1e-12, atol=1e-12)


def test_quantile_of_count_rows_matches_expanded_resamples() -> None:
    rng = np.random.default_rng(3)
    n = 400
    x = rng.normal(size=n)
    x[10:20] = x[9]  # ties
    idx = rng.integers(0, n, (30, n))
    counts = np.stack([np.bincount(r, minlength=n) for r in idx]).astype(float)
    # Rows far outside the scanned window take the full path: all mass on the smallest or on the
    # largest value.
    counts[0] = 0.0
    counts[0, np.argmin(x)] = n
    counts[1] = 0.0
    counts[1, np.argmax(x)] = n
    expanded = [np.repeat(x, c.astype(int)) for c in counts]
    for q in (0.05, 0.5, 0.95):
        qc = bs._QuantileColumn(x, q)
        assert qc.hi - qc.lo < n  # the window really is narrower than the sample
        got = qc.rows(counts, counts @ qc.below)
        np.testing.assert_allclose(got, [np.quantile(e, q) for e in expanded], rtol=1e-12)


def test_two_d_input_is_the_cluster_bootstrap_of_per_example_seed_means() -> None:
    rng = np.random.default_rng(4)
    diffs = rng.normal(0.2, 1.0, size=(50, 5))
    assert paired_bca(diffs, n_resamples=2000) == paired_bca(diffs.mean(axis=1), n_resamples=2000)
    r = paired_bootstrap(diffs, n_resamples=2000)
    assert r.n == 50  # the examples are the clusters, not the 250 cells


def test_constant_differences_give_a_degenerate_interval() -> None:
    for method in ("fast", "scipy"):
        assert paired_bca(np.full(10, 0.1), method=method) == (0.1, 0.1)
        assert paired_bca(np.full((8, 3), -2.5), method=method) == (-2.5, -2.5)
    r = paired_bootstrap(np.zeros(12))
    assert (r.low, r.high, r.p_value, r.degenerate) == (0.0, 0.0, 1.0, True)
    r = paired_bootstrap(np.ones(12), n_resamples=999)
    assert r.p_value == pytest.approx(1 / 1000)  # constant non-zero: the bootstrap's floor


def test_pvalue_is_consistent_with_the_interval() -> None:
    rng = np.random.default_rng(5)
    disagreements = 0
    for i in range(60):
        x = rng.normal(0.3, 1.0, size=40) ** 3  # skewed, so z0 and a are not 0
        null = float(rng.normal(0.3, 0.3))
        for conf in (0.9, 0.95):
            r = paired_bootstrap(x, null_value=null, n_resamples=1000, seed=i, confidence=conf)
            excluded = r.low > null or r.high < null
            disagreements += excluded != (r.p_value < 1 - conf)
        if r.p_value > 2 / 1001:
            # at confidence 1 - p one end of the interval sits on the null
            r2 = paired_bootstrap(
                x, null_value=null, n_resamples=1000, seed=i, confidence=1 - r.p_value
            )
            assert min(abs(r2.low - null), abs(r2.high - null)) < 1e-9
    assert disagreements == 0


def test_pvalue_known_answers() -> None:
    symmetric = np.concatenate([np.linspace(-1, 1, 31), -np.linspace(-1, 1, 31)])
    assert paired_bootstrap(symmetric, n_resamples=2000).p_value > 0.9
    far = np.random.default_rng(0).normal(5.0, 1.0, 40)
    assert paired_bootstrap(far, n_resamples=999).p_value == pytest.approx(1 / 1000)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([1.0, np.nan, 2.0]), r"NaN or infinite \(first at index \(1,\)\)"),
        (np.array([1.0, np.inf, 2.0]), "NaN or infinite"),
        (np.array([0.5]), "at least 2 examples, got 1"),
        (np.zeros((0,)), "at least 2 examples, got 0"),
        (np.zeros((4, 2, 2)), r"1-D array .* 2-D array .* got shape \(4, 2, 2\)"),
        (np.zeros((4, 0)), "at least one seed column"),
        (np.array(["a", "b"]), "expected an array of numbers"),
        (5.0, r"got shape \(\)"),
    ],
)
def test_bad_input_raises_a_clear_value_error(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_bca(value)  # type: ignore[arg-type]


def test_bad_options_raise() -> None:
    d = _skewed(20, 0)
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_bca(d, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples must be an integer >= 100"):
        paired_bca(d, n_resamples=10)
    with pytest.raises(ValueError, match="method must be one of"):
        paired_bca(d, method="slow")
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="positive baseline mean"):
        paired_bootstrap(np.ones(5), np.zeros(5), relative=True)
    with pytest.raises(ValueError, match="statistic must be"):
        paired_bootstrap(np.arange(5.0), np.arange(5.0), statistic="p100")
