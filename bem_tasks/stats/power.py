"""Power of the paired comparison, for planning and for saying how many examples a gate needs.

The paired analysis is a one-sample problem on the per-example differences, so power comes from
``statsmodels.stats.power.TTestPower`` with the standardized effect ``d_z = mean(diff) / sd(diff)``
(two-sided). The bootstrap CI behaves like this t-test for means at the sample sizes used here;
for other statistics pass ``sd`` as the bootstrap standard error times ``sqrt(n)``.
"""

from __future__ import annotations

import math
import warnings

MIN_N = 2


def _check(power: float | None, alpha: float) -> None:
    if power is not None and not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def achieved_power(effect_size: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test with ``n`` examples to detect ``d_z = effect_size``."""
    _check(None, alpha)
    if n < MIN_N:
        raise ValueError(f"n must be at least {MIN_N}, got {n}")
    if not math.isfinite(effect_size):
        raise ValueError(f"effect_size must be finite, got {effect_size}")
    from statsmodels.stats.power import TTestPower

    d = abs(effect_size)
    p = float(TTestPower().power(effect_size=d, nobs=n, alpha=alpha))
    if not math.isfinite(p):
        # scipy's noncentral t can return NaN for the far (lower) tail at large noncentrality.
        # That tail is below alpha/2 and vanishing there, so the upper tail alone is the power.
        from scipy import stats

        crit = stats.t.isf(alpha / 2, n - 1)
        p = float(stats.nct.sf(crit, n - 1, d * math.sqrt(n)))
    return p


def required_n(effect_size: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest number of examples for a two-sided paired t-test to reach ``power`` at ``d_z``."""
    _check(power, alpha)
    d = abs(effect_size)
    if not math.isfinite(d) or d == 0.0:
        raise ValueError(f"effect_size must be finite and non-zero, got {effect_size}")
    if achieved_power(d, MIN_N, alpha) >= power:
        return MIN_N
    # statsmodels installs an "always" filter for its warnings when sm_exceptions is first
    # imported; import it first so the filter below wins.
    import statsmodels.tools.sm_exceptions  # noqa: F401
    from statsmodels.stats.power import TTestPower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = float(TTestPower().solve_power(effect_size=d, nobs=None, alpha=alpha, power=power))
    if math.isfinite(n):
        n_int = max(MIN_N, math.ceil(n - 1e-9))
        # solve_power is a root finder: step to the exact integer boundary.
        while n_int > MIN_N and achieved_power(d, n_int - 1, alpha) >= power:
            n_int -= 1
        while achieved_power(d, n_int, alpha) < power:
            n_int += 1
        return n_int
    # The root finder fails for very large effects (n of a handful): search the power curve.
    lo, hi = MIN_N, MIN_N + 1
    while achieved_power(d, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > 10**12:
            raise ValueError(f"no sample size reaches power {power} at effect_size={effect_size}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if achieved_power(d, mid, alpha) < power else (lo, mid)
    return hi


def n_for_margin(sd: float, margin: float, *, power: float = 0.8, alpha: float = 0.05) -> int:
    """Examples needed to tell a true difference ``margin`` from zero when diffs have sd ``sd``.

    For a gate, ``margin`` is the distance between the observed effect and the threshold.
    """
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"sd must be positive and finite, got {sd}")
    if not (math.isfinite(margin) and margin != 0):
        raise ValueError(f"margin must be finite and non-zero, got {margin}")
    return required_n(abs(margin) / sd, power=power, alpha=alpha)
