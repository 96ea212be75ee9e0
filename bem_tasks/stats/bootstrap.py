"""Paired, example-level bootstrap: confidence intervals and the p-values that match them.

The unit of resampling is the example. Arrays are ``(examples,)`` or ``(examples, seeds)`` (one
value per example and seed: a "cell"); examples are resampled as whole clusters with all their
seeds (a cluster bootstrap). What a resample's statistic is depends on the statistic:

* mean: the mean over the resampled cells, which on a full examples x seeds grid is the mean of
  the per-example seed means;
* quantile (median, pNN): the Harrell-Davis estimate of the quantile of the pooled cells of the
  resampled examples (every seed of every resampled example), never a quantile of per-example
  seed means: averaging seeds first shrinks the tail and would hide a p95 that is slower under
  every seed.

Every interval is BCa (Efron & Tibshirani 1993, 14.3): bias correction from the bootstrap
distribution, acceleration from the leave-one-example-out jackknife (closed form for means,
:func:`hd_jackknife` for Harrell-Davis quantiles). Why BCa and Harrell-Davis for quantiles,
measured on latency-like data (500 examples x 3 seeds, tests/stats/test_stats_simulation.py):
BCa on the plain sample quantile covered 91.6% for a p95 ratio when candidate and baseline are
nearly proportional per example (one order statistic jumps between resamples, so its bias
correction and acceleration are noisy); the percentile interval of the Harrell-Davis estimate
(a Beta-weighted mean of all order statistics, ``scipy.stats.mstats.hdquantiles``) covered
97.4-98% there, its bootstrap sd being 10-15% above the estimator's (as was the jackknife's;
per-seed quantiles averaged over seeds, and the plain quantile's percentile interval, did no
better); BCa on the Harrell-Davis estimate covered 93.1-95.9% in both designs.

Inference is about the population of examples given the trained seeds: seeds are not resampled
(there are too few), and a t-test on seed means is never used.

Two ways to compute the same interval:

* ``method="scipy"`` calls :func:`scipy.stats.bootstrap` (``method="BCa"``; for quantiles scipy
  resamples example indices and its jackknife leaves one example out): the reference.
* ``method="fast"`` (the default) reproduces scipy's formulas for the statistics used here (mean,
  ratio of means, Harrell-Davis quantiles, and their differences or ratios). Resamples come from
  the same generator call as scipy's (``np.random.default_rng(seed).integers(0, n, (n_resamples,
  n))``) and are turned into per-example counts; one matrix product of the counts gives the
  bootstrap sums of every statistic that shares the examples (a quantile reads the Beta weights
  of the resample's order statistics off cumulative counts near the target rank). The jackknife
  is in closed form (means: ``(S - x_i) / (n - 1)``; quantiles: cumulative sums over the sorted
  cells) and the bias correction uses the bootstrap distribution, as scipy does. When
  ``n_resamples * n <= CHUNK_ELEMENTS`` the draws are scipy's own and the interval equals scipy's
  to rounding. Larger problems are drawn in chunks from the same generator; numpy usually
  continues the very same stream across chunks (the benchmark's intervals match scipy's to
  1e-16), but its rejection sampler does not guarantee it, so the documented guarantee is
  agreement within Monte Carlo error. The tests check both. Two deliberate differences in the
  bias correction (see ``bias_correction``): bootstrap values within rounding distance of the
  estimate count as ties (scipy lets the summation order decide, which moves intervals of 0/1
  metrics by a lattice step), and where scipy returns NaN because the estimate lies outside the
  whole bootstrap distribution, the percentile is clipped to ``[1/(2B), 1 - 1/(2B)]``.

p-values invert the same interval: ``p`` is the smallest ``1 - confidence`` at which the BCa
interval excludes ``null_value`` (two-sided). So ``p < 1 - confidence`` exactly when the
interval at that confidence excludes the null, and a decision never disagrees with the interval
it reports. p-values are floored at ``1 / (n_resamples + 1)``: the bootstrap cannot resolve
smaller ones.

A degenerate bootstrap distribution (every resample gives the same value up to ``TIE_RTOL``
of the data's magnitude, e.g. constant differences) has a zero-width interval ``(c, c)`` and
says nothing about sampling error: a floor of ``1 / (B + 1)`` would call three identical
differences significant. There the p-value is the exact two-sided paired sign test
(``scipy.stats.binomtest``) of the per-example differences from the null (see
``PairedStatistic.null_residuals``); differences within ``TIE_RTOL`` (1e-9) of the data's
magnitude (``max(|c|, |b|, |null|)``) are rounding, counted as ties. It needs at least 6
examples on one side to reach 0.05.

Relative changes ``T(candidate) / T(baseline) - 1`` need non-negative baseline values with
``T(baseline) > 0`` (else :class:`UndefinedStatistic`). When the baseline has a zero value (a
rare 0/1 event, a count), some resamples can have ``T(baseline) = 0`` and the ratio would be
undefined there. Such comparisons use a continuity correction: ``(T(c) + h (1 + null)) / (T(b) +
h) - 1`` with ``h`` half the smallest positive baseline value divided by the number of cells (for
a 0/1 metric: half an event, the Haldane-Anscombe correction) and ``null`` the tested value (the
gate threshold). The pseudo-observation added lies exactly on the null, so the estimate is the
raw ratio shrunk towards the null by the factor ``T(b) / (T(b) + h)``: never past it, so the
correction can make neither a pass nor a fail, on either side of the threshold (a symmetric
``+h`` on both arms pulls towards "no change", which helps a non-inferiority gate pass). The
estimate, the jackknife and every resample use the same statistic, and ``h`` is reported.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betainc, ndtr, ndtri

from bem_tasks.stats.statistic import TIE_RTOL, parse_statistic

FloatArray = NDArray[np.float64]

# Resample rows are generated this many (row x example) cells at a time: the count matrix stays
# small enough for the cache and memory stays flat however many resamples are asked for.
CHUNK_ELEMENTS = 1 << 18
MIN_RESAMPLES = 100
METHODS = ("fast", "scipy")


class UndefinedStatistic(ValueError):
    """The statistic does not exist on this sample (a relative change of a zero baseline)."""


@dataclass(frozen=True)
class BootstrapResult:
    """One statistic's bootstrap summary. ``se`` is the bootstrap standard error.

    ``degenerate``: every resample gave the same value; ``p_value`` is then the exact sign test.
    ``continuity``: the ``h`` of a relative change's zero-baseline correction (0 when none).
    """

    estimate: float
    low: float
    high: float
    p_value: float
    null_value: float
    se: float
    z0: float
    acceleration: float
    n: int
    n_resamples: int
    confidence: float
    degenerate: bool
    continuity: float = 0.0


def as_cells(values: ArrayLike, name: str = "diffs") -> FloatArray:
    """Validate ``(examples,)`` or ``(examples, seeds)`` data; return it as ``(examples, seeds)``."""
    raw = np.asarray(values)
    if np.iscomplexobj(raw):
        raise ValueError(f"{name}: expected real numbers, got complex values")
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected an array of numbers ({exc})") from None
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"{name}: expected a 1-D array (examples) or a 2-D array (examples x seeds), "
            f"got shape {arr.shape}"
        )
    if arr.ndim == 2 and arr.shape[1] == 0:
        raise ValueError(
            f"{name}: a 2-D array needs at least one seed column, got shape {arr.shape}"
        )
    if arr.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 examples, got {arr.shape[0]}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} value(s) are NaN or infinite (first at index {first}); "
            "every example needs a finite value for every seed"
        )
    return arr.reshape(arr.shape[0], -1)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_options(confidence: float, n_resamples: int, method: str, seed: int) -> None:
    """Refuse options that would fail later with a less clear error, or silently."""
    if not (isinstance(confidence, numbers.Real) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not _is_int(n_resamples) or n_resamples < MIN_RESAMPLES:
        raise ValueError(f"n_resamples must be an integer >= {MIN_RESAMPLES}, got {n_resamples!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # seed=None would draw from OS entropy: a rerun of the same task would report another CI.
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ValueError(
            f"seed must be a non-negative integer (results must be reproducible), got {seed!r}"
        )


def check_null(null_value: float, name: str = "null_value") -> float:
    if not isinstance(null_value, numbers.Real) or not math.isfinite(null_value):
        raise ValueError(f"{name} must be a finite number, got {null_value!r}")
    return float(null_value)


class PairedStatistic:
    """``T(candidate) - T(baseline)``, or ``T(candidate) / T(baseline) - 1`` when ``relative``.

    ``candidate``/``baseline`` are ``(examples, seeds)`` cells. ``T`` is the mean (``q is None``)
    or the Harrell-Davis ``q`` quantile of the pooled cells. With
    ``baseline=None`` the candidate array holds paired differences and the statistic is
    ``T(diffs)``. Both arrays are resampled with the same example indices.
    """

    def __init__(
        self,
        candidate: FloatArray,
        baseline: FloatArray | None = None,
        *,
        q: float | None = None,
        relative: bool = False,
        null_value: float = 0.0,
    ) -> None:
        candidate = candidate.reshape(candidate.shape[0], -1)
        if baseline is not None:
            baseline = baseline.reshape(baseline.shape[0], -1)
            if baseline.shape != candidate.shape:
                raise ValueError(
                    "candidate and baseline must be paired on the same examples and seeds, got "
                    f"{candidate.shape} and {baseline.shape} (examples x seeds)"
                )
        if relative and baseline is None:
            raise ValueError("a relative change needs the baseline values, not only differences")
        self.q = q
        self.relative = relative
        self.n, self.k = (int(s) for s in candidate.shape)
        self.example_c = candidate.mean(axis=1)
        self.example_b = None if baseline is None else baseline.mean(axis=1)
        self.h = 0.0
        # The continuity correction adds h (1 + null) to the candidate and h to the baseline: a
        # pseudo-observation that lies exactly on the tested null, so the correction only ever
        # moves the estimate towards the tested value (see the module docstring).
        self.null_value = float(null_value)
        if relative and not 1.0 + self.null_value > 0:
            raise ValueError(
                f"a relative change cannot be tested at {self.null_value:g} (<= -100%)"
            )
        if relative:
            assert baseline is not None
            if baseline.min() < 0:
                raise ValueError(
                    "a relative change needs non-negative baseline values, got a minimum of "
                    f"{baseline.min():g}; use an absolute comparison for this metric"
                )
            if (baseline == 0).any() and (baseline > 0).any():
                self.h = float(baseline[baseline > 0].min()) / (2.0 * baseline.size)
        # The mean of the cells is the mean of the per-example seed means: one value per example
        # keeps the mean on scipy's 1-D path. Quantiles need every cell.
        self.cols: list[FloatArray]
        if q is None:
            ec, eb = self.example_c, self.example_b
            if eb is not None and not relative:
                # mean(c) - mean(b) == mean(c - b): one column, the same numbers as scipy on diffs.
                self.cols = [ec - eb]
            else:
                self.cols = [ec] if eb is None else [ec, eb]
        else:
            self.cols = [candidate] if baseline is None else [candidate, baseline]
        if relative:
            tb = self._t(self.cols[1])
            if not tb > 0:
                raise UndefinedStatistic(
                    f"a relative change needs a positive baseline {self.describe_t()}, got {tb:g} "
                    "(every baseline value is 0, or the quantile sits on 0): the relative change "
                    "is undefined on this sample"
                )
        # Rounding scale of the statistic: values this close (1e-9 of it) count as equal.
        if relative:
            self.scale = 1.0 + abs(self.null_value)
        else:
            self.scale = max(
                float(np.max(np.abs(candidate))),
                0.0 if baseline is None else float(np.max(np.abs(baseline))),
                abs(self.null_value),
            )
        self.qcols = [] if q is None else [_HDColumn(c, q) for c in self.cols]
        # Columns whose count-weighted sums a resample needs: the values for a mean, the number
        # of the example's cells sorted below the window for a quantile.
        self.linear: list[FloatArray] = self.cols if q is None else [qc.below for qc in self.qcols]

    def describe_t(self) -> str:
        return "mean" if self.q is None else f"quantile {self.q:g}"

    def _t(self, x: FloatArray) -> float:
        # Constant data give their constant exactly (the mean's rounding would not).
        if np.all(x == x.flat[0]):
            return float(x.flat[0])
        return float(np.mean(x)) if self.q is None else harrell_davis(x, self.q)

    def values(self) -> tuple[float, float | None]:
        """``T(candidate)`` and ``T(baseline)`` without any correction (None with diffs only)."""
        if self.q is None:
            c = self._t(self.example_c)
            return c, None if self.example_b is None else self._t(self.example_b)
        return self._t(self.cols[0]), None if len(self.cols) < 2 else self._t(self.cols[1])

    def _combine(self, values: Sequence[FloatArray | float]) -> FloatArray:
        if len(values) == 1:
            return np.asarray(values[0], dtype=np.float64)
        tc, tb = (np.asarray(v, dtype=np.float64) for v in values)
        if not self.relative:
            return tc - tb
        if self.h:
            return (tc + self.h * (1.0 + self.null_value)) / (tb + self.h) - 1.0
        return tc / tb - 1.0

    def estimate(self) -> float:
        return float(self._combine([self._t(c) for c in self.cols]))

    def jackknife(self) -> FloatArray:
        """Leave-one-example-out values of the statistic (BCa's acceleration).

        Means in closed form (``(S - x_i) / (n - 1)``); Harrell-Davis quantiles from cumulative
        sums over the sorted cells (:func:`hd_jackknife`), O(cells x seeds) in all.
        """
        if self.q is None:
            return self._combine([(x.sum() - x) / (self.n - 1) for x in self.cols])
        return self._combine([hd_jackknife(x, self.q) for x in self.cols])

    def from_counts(self, counts: FloatArray, sums: list[FloatArray]) -> FloatArray:
        """Bootstrap values for resamples given as per-example counts (``sums``: counts @ linear)."""
        if self.q is None:
            return self._combine([v / self.n for v in sums])
        return self._combine([qc.rows(counts, v) for qc, v in zip(self.qcols, sums, strict=True)])

    def null_residuals(self, null_value: float) -> FloatArray:
        """Per-example signed distance from the null, for the exact sign test.

        Per-example seed means ``c_i``, ``b_i``: ``c_i - b_i - null`` for a difference (``d_i -
        null`` for diffs), and ``c_i - (1 + null) b_i`` for a relative change, which has the sign
        of ``c_i / b_i - 1 - null`` without dividing by a zero ``b_i`` (the continuity correction
        cancels: ``(c_i + h (1 + null)) - (1 + null) (b_i + h)``).
        """
        c, b = self.example_c, self.example_b
        if b is None:
            return c - null_value
        if self.relative:
            return c - (1.0 + null_value) * b
        return c - b - null_value

    def residual_scale(self, null_value: float) -> float:
        """Magnitude of the terms of :meth:`null_residuals`: their rounding is relative to it."""
        c, b = self.example_c, self.example_b
        m = max(float(np.max(np.abs(c))), abs(null_value))
        if b is not None:
            m = max(m, float(np.max(np.abs(b))) * (1.0 + abs(null_value)))
        return m

    def scipy_call(self) -> tuple[tuple[NDArray[np.generic], ...], object, bool]:
        q = self.q
        if q is not None:
            # Pooled cells of resampled examples: let scipy resample example indices, with
            # exactly the draws it makes for paired data.
            cols = self.cols

            def pooled(ix: NDArray[np.generic], axis: int = -1) -> FloatArray:
                # scipy also calls it on leave-one-out index sets (BCa's jackknife)
                i = np.moveaxis(np.asarray(ix).astype(np.intp), axis, -1)
                w = hd_weights(i.shape[-1] * cols[0].shape[1], q)
                ts = [np.sort(c[i].reshape(*i.shape[:-1], -1), axis=-1) @ w for c in cols]
                return self._combine(ts)

            return (np.arange(self.n),), pooled, False

        def mean(x: FloatArray, axis: int = -1) -> FloatArray:
            return np.mean(x, axis=axis)

        if len(self.cols) == 1:
            return (self.cols[0],), mean, False

        def stat(c: FloatArray, b: FloatArray, axis: int = -1) -> FloatArray:
            return self._combine([mean(c, axis), mean(b, axis)])

        return (self.cols[0], self.cols[1]), stat, True


def hd_weights(n_values: int, q: float) -> FloatArray:
    """Harrell-Davis weights of the sorted values: Beta((N+1)q, (N+1)(1-q)) mass per order stat."""
    a, b = q * (n_values + 1), (1.0 - q) * (n_values + 1)
    return np.diff(betainc(a, b, np.arange(n_values + 1) / n_values))


def harrell_davis(x: FloatArray, q: float) -> float:
    """The Harrell-Davis estimate of the q quantile of all values of ``x`` (any shape).

    Equal to ``scipy.stats.mstats.hdquantiles(x.ravel(), [q])``.
    """
    flat = np.sort(np.asarray(x, dtype=np.float64).ravel())
    return float(flat @ hd_weights(flat.size, q))


def hd_jackknife(x: FloatArray, q: float) -> FloatArray:
    """Leave-one-example-out Harrell-Davis q quantiles of the pooled cells of ``x``.

    ``x`` is ``(examples, seeds)``: leaving example i out removes its k cells, and every cell
    after the j-th removed one moves j places down in the sorted order. With ``C_j`` the
    cumulative sum of ``w'[t - j] s_t`` (``w'`` the weights of N - k cells), example i's value is
    a sum of k + 1 differences of ``C_0 .. C_k`` between its cells' sorted positions.
    """
    x = x.reshape(x.shape[0], -1)
    n, k = x.shape
    big_n = n * k
    w = hd_weights(big_n - k, q)
    order = np.argsort(x.ravel(), kind="stable")
    s = x.ravel()[order]
    pos = np.empty(big_n, dtype=np.intp)
    pos[order] = np.arange(big_n)
    p = np.sort(pos.reshape(n, k), axis=1)  # sorted positions of each example's cells
    t = np.arange(big_n)
    cum = np.zeros((k + 1, big_n + 1))
    for j in range(k + 1):
        idx = t - j
        ok = (idx >= 0) & (idx < big_n - k)
        cum[j, 1:] = np.cumsum(np.where(ok, w[np.clip(idx, 0, big_n - k - 1)], 0.0) * s)
    out = cum[0, p[:, 0]] - cum[0, 0]
    for j in range(1, k):
        out = out + cum[j, p[:, j]] - cum[j, p[:, j - 1] + 1]
    out = out + cum[k, big_n] - cum[k, p[:, k - 1] + 1]
    return out


class _HDColumn:
    """The Harrell-Davis q quantile of the pooled cells of resamples given as example counts.

    ``x`` is ``(examples, seeds)``; a resample with per-example counts ``c_i`` holds each of
    example i's cells ``c_i`` times, N = n * seeds cells in all. Its Harrell-Davis estimate is
    ``sum_j s_j (I(C_j / N) - I(C_{j-1} / N))`` over the sorted cells ``s_j``, with ``C_j`` the
    resample's count of cells at sorted positions ``<= j`` and ``I`` the Beta((N+1)q, (N+1)(1-q))
    CDF. That Beta has sd ``sqrt(q (1 - q) / N)``, so only a window of sorted positions
    ``[lo, hi)`` whose cumulative count lies near ``q N`` carries weight; the count below the
    window comes from the shared matrix product (``below``: per example, how many of its cells
    sort below the window). Rows that leave more than 1e-12 of the weight outside the window are
    recomputed over all positions.
    """

    def __init__(self, x: FloatArray, q: float) -> None:
        x = x.reshape(x.shape[0], -1)
        n, k = x.shape
        self.n_cells = n * k
        # Cumulative counts are integers 0..N: the Beta CDF is read from a table, not recomputed.
        self.cdf = np.concatenate([[0.0], np.cumsum(hd_weights(self.n_cells, q))])
        self.owner = np.repeat(np.arange(n), k)  # example of each cell (row-major)
        self.order = np.argsort(x.ravel(), kind="stable")
        self.s = x.ravel()[self.order]
        target = int(np.floor(q * self.n_cells))
        # A resample's count of cells below a position is sum_i c_i m_i (m_i: example i's cells
        # below it, c_i multinomial(n, 1/n)); its variance is sum m_i^2 - (sum m_i)^2 / n. The
        # Beta weight spreads over sqrt(N q (1 - q)) positions; 12 of the larger sd either side.
        m = np.bincount(self.owner[self.order[:target]], minlength=n).astype(np.float64)
        sd_count = float(np.sqrt(max(float(m @ m) - float(m.sum()) ** 2 / n, 0.0)))
        sd_beta = float(np.sqrt(self.n_cells * q * (1.0 - q)))
        margin = int(12 * max(sd_count, sd_beta)) + 2 + k
        self.lo = max(0, target - margin)
        self.hi = min(self.n_cells, target + margin + 1)
        self.window = self.owner[self.order[self.lo : self.hi]]
        self.below = np.bincount(self.owner[self.order[: self.lo]], minlength=n).astype(np.float64)

    def _weights(self, cum: FloatArray, start: FloatArray) -> FloatArray:
        at = np.concatenate([start[:, None], cum], axis=1).astype(np.intp)
        return np.diff(self.cdf[at], axis=1)

    def rows(self, counts: FloatArray, below: FloatArray) -> FloatArray:
        cum = below[:, None] + np.cumsum(counts[:, self.window], axis=1)
        w = self._weights(cum, below)
        out = w @ self.s[self.lo : self.hi]
        lost = 1.0 - w.sum(axis=1)
        outside = lost > 1e-12
        if outside.any():
            full = np.cumsum(counts[outside][:, self.owner[self.order]], axis=1)
            wf = self._weights(full, np.zeros(full.shape[0]))
            out[outside] = wf @ self.s
        return out


def resample_counts(n: int, n_resamples: int, seed: int) -> Iterator[FloatArray]:
    """Blocks of bootstrap resamples as ``(rows, n)`` count matrices, scipy's draws in order."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_resamples, CHUNK_ELEMENTS // n))
    for start in range(0, n_resamples, rows):
        b = min(rows, n_resamples - start)
        idx = rng.integers(0, n, (b, n))
        idx += (np.arange(b, dtype=idx.dtype) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_distributions(
    stats: Sequence[PairedStatistic], n_resamples: int, seed: int
) -> list[FloatArray]:
    """Bootstrap distributions of several statistics over the same examples and the same draws.

    Sharing the draws is what calling scipy once per statistic with the same seed does too (it
    regenerates the identical index matrix each time); here the draws are made once.
    """
    if not stats:
        return []
    n = stats[0].n
    if any(s.n != n for s in stats):
        raise ValueError("statistics sharing bootstrap draws must have the same number of examples")
    x = np.column_stack([c for s in stats for c in s.linear])
    out = [np.empty(n_resamples) for _ in stats]
    pos = 0
    for counts in resample_counts(n, n_resamples, seed):
        b = counts.shape[0]
        sums = counts @ x  # one matrix product serves every statistic
        col = 0
        for i, s in enumerate(stats):
            k = len(s.linear)
            out[i][pos : pos + b] = s.from_counts(counts, [sums[:, col + j] for j in range(k)])
            col += k
        pos += b
    return out


def acceleration(jack: FloatArray) -> float:
    """BCa acceleration from jackknife values (scipy's formula; 0 when the jackknife is flat)."""
    u = jack.mean() - jack
    den = float(np.sum(u**2))
    if den == 0.0:
        return 0.0
    return float(np.sum(u**3) / den**1.5 / 6.0)


def bias_correction(theta_b_sorted: FloatArray, theta_hat: float, *, scipy_rule: bool) -> float:
    """z0 from the mid-rank of the estimate in the bootstrap distribution.

    ``scipy_rule=True`` is scipy's exact comparison. Otherwise values within rounding distance
    (1e-9 of the scale) of the estimate count as ties, as they would in exact arithmetic: with
    lattice data such as 0/1 EM many resamples have exactly the original mean, and whether the
    summation order rounds them below or above it should not move the interval. The percentile
    is also clipped to ``[1/(2B), 1 - 1/(2B)]`` where scipy would return NaN.
    """
    s = theta_b_sorted
    b = s.shape[0]
    tol = 0.0 if scipy_rule else 1e-9 * max(abs(theta_hat), float(s[-1] - s[0]))
    below = np.searchsorted(s, theta_hat - tol, side="left")
    at_or_below = np.searchsorted(s, theta_hat + tol, side="right")
    pct = (below + at_or_below) / (2.0 * b)
    if not scipy_rule:
        pct = min(max(pct, 0.5 / b), 1.0 - 0.5 / b)
    return float(ndtri(pct))


def bca_levels(z0: float, a: float, confidence: float) -> tuple[float, float]:
    """Quantile levels of the BCa interval's ends (scipy's ``_bca_interval``)."""
    z_alpha = float(ndtri((1.0 - confidence) / 2.0))
    num1 = z0 + z_alpha
    num2 = z0 - z_alpha
    return float(ndtr(z0 + num1 / (1 - a * num1))), float(ndtr(z0 + num2 / (1 - a * num2)))


def _tail_for_level(level: float, z0: float, a: float) -> float:
    """Inverse of the BCa map: the tail probability whose adjusted quantile level is ``level``."""
    if level <= 0.0:
        return 0.0
    if level >= 1.0:
        return 1.0
    v = float(ndtri(level)) - z0
    if 1.0 + a * v <= 0.0:
        # Outside what the BCa map can reach: below its range when a > 0, above when a < 0.
        return 0.0 if a > 0 else 1.0
    u = v / (1.0 + a * v)
    return float(ndtr(u - z0))


def bca_pvalue(theta_b_sorted: FloatArray, z0: float, a: float, null_value: float) -> float:
    """Two-sided p-value: the smallest 1 - confidence whose interval excludes the null."""
    s = theta_b_sorted
    b = s.shape[0]
    # Largest quantile level whose value is <= null, and smallest whose value is >= null
    # (inverse of numpy's linear quantile: position h = level * (b - 1)).
    j_hi = int(np.searchsorted(s, null_value, side="right"))
    if j_hi == 0:
        level_hi = -1.0
    elif j_hi == b:
        level_hi = 1.0
    else:
        lo_v, hi_v = s[j_hi - 1], s[j_hi]
        level_hi = (j_hi - 1 + (null_value - lo_v) / (hi_v - lo_v)) / (b - 1)
    j_lo = int(np.searchsorted(s, null_value, side="left"))
    if j_lo == b:
        level_lo = 2.0
    elif j_lo == 0:
        level_lo = 0.0
    else:
        lo_v, hi_v = s[j_lo - 1], s[j_lo]
        level_lo = (j_lo - 1 + (null_value - lo_v) / (hi_v - lo_v)) / (b - 1)
    # Excluded from below when the lower end's level exceeds level_hi; from above when the upper
    # end's level is under level_lo.
    tail = min(_tail_for_level(level_hi, z0, a), 1.0 - _tail_for_level(level_lo, z0, a))
    return float(min(1.0, max(2.0 * tail, 1.0 / (b + 1))))


def sign_test_pvalue(residuals: FloatArray, scale: float) -> float:
    """Exact two-sided sign test that positive and negative residuals are equally likely.

    ``scale`` is the magnitude of the values the residuals were computed from (the data and the
    null). Residuals within ``TIE_RTOL * scale`` of 0 are rounding, not signs: they are ties and
    are dropped, as the sign test does; all ties give p = 1. (``c = b + 0.1`` tested at 0.1
    leaves residuals of about 1e-14 of either sign: ties, not 40 signs.)
    """
    from scipy.stats import binomtest

    tol = TIE_RTOL * scale
    pos = int(np.count_nonzero(residuals > tol))
    m = pos + int(np.count_nonzero(residuals < -tol))
    if m == 0:
        return 1.0
    return float(binomtest(pos, m, 0.5).pvalue)


def _finish(
    stat: PairedStatistic,
    theta_b: FloatArray,
    *,
    confidence: float,
    null_value: float,
    scipy_ci: tuple[float, float] | None = None,
) -> BootstrapResult:
    theta_hat = stat.estimate()
    b = theta_b.shape[0]
    s = np.sort(theta_b)
    se = float(np.std(theta_b, ddof=1))
    # Every resample gave the same value up to rounding (relative to the data's own scale).
    span = float(s[-1] - s[0])
    if span <= TIE_RTOL * max(stat.scale, abs(theta_hat), abs(float(s[0])), abs(float(s[-1]))):
        p = sign_test_pvalue(stat.null_residuals(null_value), stat.residual_scale(null_value))
        return BootstrapResult(
            theta_hat, theta_hat, theta_hat, p, null_value, 0.0, 0.0, 0.0, stat.n, b,
            confidence, True, stat.h,
        )  # fmt: skip
    a = acceleration(stat.jackknife())
    z0 = bias_correction(s, theta_hat, scipy_rule=scipy_ci is not None)
    if scipy_ci is None:
        lv, hv = bca_levels(z0, a, confidence)
        low, high = (float(v) for v in np.quantile(s, [lv, hv]))
    else:
        low, high = scipy_ci
    p = bca_pvalue(s, z0, a, null_value)
    return BootstrapResult(
        theta_hat, low, high, p, null_value, se, z0, a, stat.n, b, confidence, False, stat.h
    )


def bootstrap_many(
    stats: Sequence[PairedStatistic],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "fast",
    null_values: Sequence[float] | None = None,
) -> list[BootstrapResult]:
    """BCa results for statistics over the same examples (``fast`` shares one set of draws)."""
    check_options(confidence, n_resamples, method, seed)
    nulls = list(null_values) if null_values is not None else [0.0] * len(stats)
    if len(nulls) != len(stats):
        raise ValueError("null_values needs one value per statistic")
    nulls = [check_null(v, f"null_values[{i}]") for i, v in enumerate(nulls)]
    if method == "fast":
        dists = bootstrap_distributions(stats, n_resamples, seed)
        return [
            _finish(s, d, confidence=confidence, null_value=nv)
            for s, d, nv in zip(stats, dists, nulls, strict=True)
        ]
    return [
        _scipy_one(s, confidence=confidence, n_resamples=n_resamples, seed=seed, null_value=nv)
        for s, nv in zip(stats, nulls, strict=True)
    ]


def _scipy_one(
    stat: PairedStatistic, *, confidence: float, n_resamples: int, seed: int, null_value: float
) -> BootstrapResult:
    from scipy import stats as sps

    data, fn, paired = stat.scipy_call()
    with warnings.catch_warnings():
        # Constant data make scipy warn and return NaN; that case is handled just below.
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.bootstrap(
            data,
            fn,
            n_resamples=n_resamples,
            rng=seed,
            method="BCa",
            confidence_level=confidence,
            paired=paired,
            vectorized=True,
        )
    theta_b = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        result = _finish(stat, theta_b, confidence=confidence, null_value=null_value)
        if result.degenerate:
            return result
        raise ValueError(
            "scipy.stats.bootstrap could not compute a BCa interval (the estimate lies outside "
            "the bootstrap distribution or the jackknife is flat); use method='fast'"
        )
    return _finish(
        stat, theta_b, confidence=confidence, null_value=null_value, scipy_ci=(low, high)
    )


def paired_bootstrap(
    candidate: ArrayLike,
    baseline: ArrayLike | None = None,
    *,
    statistic: str = "mean",
    relative: bool = False,
    null_value: float = 0.0,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "fast",
) -> BootstrapResult:
    """Bootstrap BCa interval and two-sided p-value for one paired comparison.

    ``candidate``/``baseline`` are ``(examples,)`` or ``(examples, seeds)`` arrays of the same
    shape; with ``baseline=None`` ``candidate`` holds paired differences. The statistic is
    ``T(candidate) - T(baseline)`` (``relative=False``) or ``T(candidate) / T(baseline) - 1``,
    with ``T`` the mean or a Harrell-Davis quantile (``statistic="p95"``) of the pooled example
    x seed values; ``null_value`` is the value the p-value tests (two-sided), and the value a
    zero-baseline continuity correction moves a relative change towards (module docstring);
    an all-zero baseline raises :class:`UndefinedStatistic`. ``seed`` must be a non-negative
    integer: the same inputs always give the same result. Bad input raises ValueError.
    """
    check_options(confidence, n_resamples, method, seed)
    null_value = check_null(null_value)
    c = as_cells(candidate, "candidate" if baseline is not None else "diffs")
    b = None if baseline is None else as_cells(baseline, "baseline")
    if baseline is not None:
        shape_c, shape_b = np.shape(candidate), np.shape(baseline)
        if shape_c != shape_b:
            raise ValueError(
                "candidate and baseline must have the same shape (examples x seeds), got "
                f"{shape_c} and {shape_b}"
            )
    stat = PairedStatistic(
        c, b, q=parse_statistic(statistic), relative=relative, null_value=null_value
    )
    return bootstrap_many(
        [stat],
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
        method=method,
        null_values=[null_value],
    )[0]


def paired_bca(
    diffs: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "fast",
) -> tuple[float, float]:
    """BCa confidence interval ``(low, high)`` of the mean paired difference.

    ``diffs`` is a 1-D array of per-example differences (candidate - baseline) or a 2-D
    ``examples x seeds`` array: examples are resampled as clusters, so the statistic is the mean
    over resampled rows of the per-example seed means. ``method="scipy"`` is
    :func:`scipy.stats.bootstrap` (``method="BCa"``, ``rng=seed``); ``method="fast"`` reproduces
    it (same draws when ``n_resamples * n <= CHUNK_ELEMENTS``, otherwise equal within Monte Carlo
    error; see the module docstring). Constant differences give ``(c, c)``. Raises ValueError on
    NaN/inf, complex values, fewer than 2 examples or a shape other than 1-D/2-D.
    """
    r = paired_bootstrap(
        diffs, None, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method
    )
    return r.low, r.high
