"""BCa bootstrap: equality with scipy, Monte Carlo agreement, p-values, clusters, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.stats.mstats import hdquantiles

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


def test_harrell_davis_is_scipys_hdquantiles() -> None:
    x = np.random.default_rng(2).normal(size=(41, 3))
    for q in (0.05, 0.5, 0.95):
        assert bs.harrell_davis(x, q) == pytest.approx(float(hdquantiles(x.ravel(), [q])[0]))


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
        col = bs._HDColumn(x[:, None], q)
        assert col.hi - col.lo < n  # the window really is narrower than the sample
        got = col.rows(counts, counts @ col.below)
        want = [float(hdquantiles(e, [q])[0]) for e in expanded]
        np.testing.assert_allclose(got, want, rtol=1e-12)


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


@pytest.mark.parametrize("method", ["fast", "scipy"])
def test_degenerate_bootstrap_uses_the_exact_sign_test(method: str) -> None:
    # n=3 identical differences: the bootstrap floor would say p = 1/(B+1); the exact two-sided
    # sign test says 2 * 0.5**3 = 0.25.
    r = paired_bootstrap(np.full(3, 2.0), null_value=1.5, n_resamples=999, method=method)
    assert (r.low, r.high, r.degenerate) == (2.0, 2.0, True)
    assert r.p_value == pytest.approx(0.25)
    r = paired_bootstrap(np.ones(12), n_resamples=999, method=method)
    assert r.p_value == pytest.approx(2 * 0.5**12)
    assert r.p_value == pytest.approx(sps.binomtest(12, 12).pvalue)
    # paired arrays: the residual is c_i - b_i - null per example (seed means)
    base = np.arange(20.0).reshape(10, 2)
    r = paired_bootstrap(base + 1.0, base, null_value=0.5, n_resamples=500, method=method)
    assert r.degenerate and r.p_value == pytest.approx(2 * 0.5**10)
    # on the null itself every residual is a tie: p = 1
    r = paired_bootstrap(base + 1.0, base, null_value=1.0, n_resamples=500, method=method)
    assert r.p_value == 1.0


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


def test_quantile_pvalue_is_consistent_with_its_bca_interval() -> None:
    rng = np.random.default_rng(15)
    disagreements, excluded, adjusted = 0, 0, 0
    for i in range(30):
        base = rng.lognormal(3.0, 0.3, size=(60, 2))
        cand = base * rng.lognormal(0.05, 0.1, size=(60, 2))
        null = float(rng.normal(0.05, 0.05))
        r = paired_bootstrap(cand, base, statistic="p95", relative=True, null_value=null,
                             n_resamples=1000, seed=i)  # fmt: skip
        adjusted += r.z0 != 0.0 and r.acceleration != 0.0  # BCa, not the percentile interval
        excluded += r.low > null or r.high < null
        disagreements += (r.low > null or r.high < null) != (r.p_value < 0.05)
    assert disagreements == 0 and 5 <= excluded <= 25  # both cases occur
    assert adjusted == 30


def test_pvalue_known_answers() -> None:
    symmetric = np.concatenate([np.linspace(-1, 1, 31), -np.linspace(-1, 1, 31)])
    assert paired_bootstrap(symmetric, n_resamples=2000).p_value > 0.9
    far = np.random.default_rng(0).normal(5.0, 1.0, 40)
    assert paired_bootstrap(far, n_resamples=999).p_value == pytest.approx(1 / 1000)  # the floor


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
        (np.array([1.0 + 2.0j, 2.0, 3.0]), "expected real numbers, got complex values"),
    ],
)
def test_bad_input_raises_a_clear_value_error(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_bca(value)  # type: ignore[arg-type]


def test_bad_options_raise() -> None:
    d = _skewed(20, 0)
    with pytest.raises(ValueError, match="confidence must be a number in"):
        paired_bca(d, confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples must be an integer >= 100"):
        paired_bca(d, n_resamples=10)
    with pytest.raises(ValueError, match="method must be one of"):
        paired_bca(d, method="slow")
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="positive baseline mean"):
        paired_bootstrap(np.ones(5), np.zeros(5), relative=True)
    with pytest.raises(ValueError, match="non-negative baseline values, got a minimum of -1"):
        paired_bootstrap(np.ones(5), np.array([-1.0, 2, 3, 4, 5]), relative=True)
    with pytest.raises(ValueError, match="statistic must be"):
        paired_bootstrap(np.arange(5.0), np.arange(5.0), statistic="p100")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"null_value": float("nan")}, "null_value must be a finite number, got nan"),
        ({"null_value": float("inf")}, "null_value must be a finite number, got inf"),
        ({"null_value": "0.1"}, "null_value must be a finite number, got '0.1'"),
        ({"n_resamples": 1000.5}, "n_resamples must be an integer >= 100, got 1000.5"),
        ({"n_resamples": 1000.0}, "n_resamples must be an integer >= 100, got 1000.0"),
        ({"n_resamples": "1000"}, "n_resamples must be an integer >= 100, got '1000'"),
        ({"n_resamples": None}, "n_resamples must be an integer >= 100, got None"),
        ({"n_resamples": True}, "n_resamples must be an integer"),
        ({"seed": None}, "seed must be a non-negative integer .*reproducible.*got None"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"confidence": float("nan")}, "confidence must be a number in"),
    ],
)
def test_bad_options_are_value_errors(options: dict[str, object], match: str) -> None:
    d = _skewed(20, 0)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(d, **options)  # type: ignore[arg-type]


def test_numpy_integer_options_are_accepted() -> None:
    d = _skewed(20, 0)
    a = paired_bootstrap(d, n_resamples=np.int64(500), seed=np.int32(3))  # type: ignore[arg-type]
    assert (a.low, a.high) == paired_bca(d, n_resamples=500, seed=3)


# ---------------------------------------------------------------- pooled quantiles with seeds


def _tail_only_under_one_seed(n: int = 200, seeds: int = 5, slow: float = 1.27) -> tuple:
    """Latencies where every seed's p95 is +27% but each slow example is slow under one seed.

    Per seed a different 10% of the examples is slow (example i under seed (i % 10) / 2 when
    i % 10 is even), so averaging seeds first turns +27% into +27% / 5 and hides the tail.
    """
    i = np.arange(n)[:, None]
    j = np.arange(seeds)[None, :]
    base = 100.0 + 0.1 * (i % 7) + 0.01 * j
    cand = np.where(i % 10 == 2 * j, base * slow, base)
    return cand, base


def test_every_seeds_p95_is_slower_and_the_pooled_statistic_says_so() -> None:
    cand, base = _tail_only_under_one_seed()
    per_seed = np.quantile(cand, 0.95, axis=0) / np.quantile(base, 0.95, axis=0) - 1
    assert np.all(per_seed > 0.26)  # every seed fails a +15% gate by far
    seed_means = np.quantile(cand.mean(1), 0.95) / np.quantile(base.mean(1), 0.95) - 1
    assert seed_means < 0.06  # what averaging the seeds first would have reported
    r = paired_bootstrap(
        cand, base, statistic="p95", relative=True, null_value=0.15, n_resamples=1000
    )
    hd = [float(hdquantiles(x.ravel(), [0.95])[0]) for x in (cand, base)]
    assert r.estimate == pytest.approx(hd[0] / hd[1] - 1)
    assert r.estimate > 0.26 and r.low > 0.15  # the CI lies entirely above +15%
    assert r.n == 200  # examples are still the resampled units


@pytest.mark.parametrize("statistic", ["median", "p95"])
@pytest.mark.parametrize("relative", [False, True])
def test_fast_equals_scipy_for_pooled_quantiles_with_seeds(statistic: str, relative: bool) -> None:
    rng = np.random.default_rng(12)
    base = rng.lognormal(3.0, 0.4, size=(70, 1)) * rng.lognormal(0.0, 0.2, size=(70, 3))
    cand = base * rng.lognormal(0.05, 0.2, size=(70, 3))
    kw = dict(statistic=statistic, relative=relative, n_resamples=2000, seed=5)
    fast = paired_bootstrap(cand, base, **kw)  # type: ignore[arg-type]
    ref = paired_bootstrap(cand, base, method="scipy", **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose([fast.low, fast.high], [ref.low, ref.high], rtol=1e-10)
    np.testing.assert_allclose(fast.p_value, ref.p_value, rtol=1e-8)
    assert fast.estimate == ref.estimate


def test_pooled_quantile_matches_a_direct_scipy_call_on_example_indices() -> None:
    rng = np.random.default_rng(13)
    cand = rng.gamma(3.0, 1.0, size=(40, 4))
    base = rng.gamma(3.0, 1.0, size=(40, 4))

    def hd(x: np.ndarray) -> np.ndarray:  # Harrell-Davis p90 along the last axis
        return np.apply_along_axis(lambda v: hdquantiles(v, [0.9])[0], -1, x)

    def pooled_p90_diff(ix: np.ndarray, axis: int = -1) -> np.ndarray:
        ix = np.moveaxis(ix, axis, -1)
        return hd(cand[ix].reshape(*ix.shape[:-1], -1)) - hd(base[ix].reshape(*ix.shape[:-1], -1))

    ref = sps.bootstrap((np.arange(40),), pooled_p90_diff, n_resamples=300, rng=2, method="BCa")
    ours = paired_bootstrap(cand, base, statistic="p90", n_resamples=300, seed=2)
    np.testing.assert_allclose(
        [ours.low, ours.high], [ref.confidence_interval.low, ref.confidence_interval.high],
        rtol=1e-10,
    )  # fmt: skip


def test_pooled_quantile_of_count_rows_matches_expanded_resamples() -> None:
    rng = np.random.default_rng(7)
    n, k = 300, 3
    x = rng.normal(size=(n, 1)) + 0.3 * rng.normal(size=(n, k))  # seeds correlated in an example
    idx = rng.integers(0, n, (25, n))
    counts = np.stack([np.bincount(r, minlength=n) for r in idx]).astype(float)
    counts[0] = 0.0
    counts[0, np.argmax(x.max(axis=1))] = n  # far outside the window: the full path
    expanded = [np.repeat(x, c.astype(int), axis=0).ravel() for c in counts]
    for q in (0.05, 0.5, 0.95):
        col = bs._HDColumn(x, q)
        assert col.hi - col.lo < n * k
        got = col.rows(counts, counts @ col.below)
        want = [float(hdquantiles(e, [q])[0]) for e in expanded]
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- zero baselines


def test_rare_zero_one_baseline_has_a_defined_relative_change() -> None:
    # 3 violations in 200 for the baseline, 1 for the candidate: about 5% of resamples have no
    # baseline violation, where the plain ratio is undefined.
    base = np.zeros(200)
    base[[10, 70, 150]] = 1.0
    cand = np.zeros(200)
    cand[70] = 1.0
    h = 1.0 / (2 * 200)  # half an event over 200 examples
    for method in ("fast", "scipy"):
        r = paired_bootstrap(
            cand, base, relative=True, null_value=-0.30, n_resamples=2000, seed=1, method=method
        )
        assert r.continuity == h
        # h (1 + null) added to the candidate, h to the baseline: -61% (raw -67%), towards the
        # tested -30% and never past it
        assert r.estimate == pytest.approx((1 / 200 + 0.7 * h) / (3 / 200 + h) - 1)
        assert np.isfinite([r.low, r.high, r.p_value]).all()
        assert r.low < -0.30 < r.high  # 3 -> 1 events cannot show a 30% reduction
    # The same statistic everywhere: the first resamples by hand.
    idx = np.random.default_rng(1).integers(0, 200, (5, 200))
    by_hand = (cand[idx].mean(1) + h) / (base[idx].mean(1) + h) - 1
    stat = bs.PairedStatistic(cand[:, None], base[:, None], relative=True)
    (dist,) = bs.bootstrap_distributions([stat], 5, 1)
    np.testing.assert_allclose(dist, by_hand, rtol=1e-12)


def test_no_correction_without_zero_baselines() -> None:
    rng = np.random.default_rng(9)
    base = rng.lognormal(3.0, 0.3, 50)
    r = paired_bootstrap(base * 1.1, base, relative=True, n_resamples=500)
    assert r.continuity == 0.0 and r.estimate == pytest.approx(0.1)


@pytest.mark.parametrize("null", [-0.30, 0.0, 0.15])
@pytest.mark.parametrize("events", [(3, 1), (3, 6), (2, 2), (5, 9)])
def test_continuity_correction_only_moves_towards_the_tested_value(
    null: float, events: tuple[int, int]
) -> None:
    # The correction shrinks the raw ratio towards 1 + null by the factor T(b) / (T(b) + h):
    # it can make neither a pass nor a fail of a gate tested at `null`, in either direction.
    nb, nc = events
    base, cand = np.zeros(200), np.zeros(200)
    base[:nb] = 1.0
    cand[50 : 50 + nc] = 1.0
    r = paired_bootstrap(cand, base, relative=True, null_value=null, n_resamples=200)
    raw = nc / nb - 1
    h = 1 / 400
    assert r.estimate - null == pytest.approx((raw - null) * (nb / 200) / (nb / 200 + h))
    assert min(raw, null) <= r.estimate <= max(raw, null)
