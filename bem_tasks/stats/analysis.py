"""The statistical analysis of a set of paired metrics: CIs, p-values, BH-FDR and effect sizes.

``analyze`` takes one :class:`MetricData` (or a mapping with the same keys) per metric, mission
and slice, and returns one JSON-serialisable dict per input, in the input order (written as
``statistical_results.json``). See :data:`RESULT_KEYS` for what each dict holds.

Multiplicity: p-values are adjusted with Benjamini-Hochberg within each family, a family being
``(mission, slice, family)``: the families declared in the gates config (e.g. performance, system,
safety), kept apart per slice so that report-only slices never dilute the gatekeeping one.

A comparison whose statistic does not exist on the sample (a relative change of a baseline whose
values are all 0) does not stop the others: its dict carries ``error`` (the message) and no
numbers, takes no part in the BH adjustment, and a gate on it is ``missing`` with that reason.
Any other bad input raises ValueError naming the metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from bem_tasks.stats.bootstrap import (
    PairedStatistic,
    UndefinedStatistic,
    as_cells,
    bootstrap_many,
    check_null,
    parse_statistic,
    sign_test_pvalue,
)
from bem_tasks.stats.multitest import bh_adjust

RESULT_KEYS = (
    "mission",  # identifiers, as given
    "metric",
    "slice",
    "family",
    "statistic",  # "mean", "median" or "pNN" (Harrell-Davis): T in T(candidate) -/÷ T(baseline)
    "relative",  # True: estimate = T(candidate) / T(baseline) - 1; False: T(candidate) - T(baseline)
    "higher_is_better",
    "n",  # examples (the resampled clusters)
    "n_seeds",  # seeds per example; quantiles are taken over the pooled n x n_seeds values
    "estimate",  # the statistic; ci_low/ci_high: its two-sided BCa interval at `confidence`
    # (of the mean, or of the Harrell-Davis quantile; see bem_tasks.stats.bootstrap)
    "ci_low",
    "ci_high",
    "confidence",
    "null_value",  # what p_value tests (two-sided), 0 unless a gate asks for its threshold
    "p_value",  # interval inversion: p < 1 - confidence exactly when the CI excludes null_value;
    # the exact sign test when the bootstrap is degenerate (see p_value_method)
    "p_value_method",  # "interval_inversion" or "exact_sign_test"
    "p_adjusted",  # Benjamini-Hochberg within (mission, slice, family)
    "family_size",  # hypotheses in that family
    "significant",  # p_adjusted < alpha
    "favours",  # "candidate"/"baseline" when the two-sided test of no change (0) rejects at
    # 1 - confidence (unadjusted; the CI excludes 0, or the exact sign test when degenerate)
    "se",  # bootstrap standard error of the estimate
    "mean_diff",  # mean(candidate) - mean(baseline), per-example seed means
    "sd_diff",  # sd (ddof=1) of the per-example differences
    "effect_size_dz",  # mean_diff / sd_diff (None when sd_diff is 0)
    "relative_change",  # mean(candidate) / mean(baseline) - 1 (None when the baseline mean is 0)
    "baseline_mean",
    "candidate_mean",
    "baseline_value",  # T(baseline) and T(candidate): equal to the means when statistic is "mean"
    "candidate_value",
    "degenerate",  # every resample gave the same value (e.g. constant differences)
    "continuity",  # h of the zero-baseline correction of a relative change, 0 when not needed
    "method",  # "fast" or "scipy" (see bem_tasks.stats.bootstrap)
    "n_resamples",
    "seed",
    "alpha",
    "error",  # None, or why the statistic is undefined on this sample (then no numbers)
)


_REQUIRED = ("mission", "metric", "slice", "family", "candidate", "baseline")


@dataclass(frozen=True)
class MetricData:
    """One paired comparison: candidate and baseline values on the same examples.

    ``candidate`` and ``baseline`` are ``(examples,)`` or ``(examples, seeds)`` with the same
    shape, row ``i`` being the same example in both and column ``j`` the same seed. ``null_value`` is what the p-value tests;
    a gate's threshold when the comparison backs a gate (see ``bem_tasks.gates.analysis_specs``).
    """

    mission: str
    metric: str
    slice: str
    family: str
    candidate: ArrayLike
    baseline: ArrayLike
    higher_is_better: bool = True
    relative: bool = False
    statistic: str = "mean"
    null_value: float = 0.0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], where: str = "metric") -> MetricData:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {unknown}; expected keys from {sorted(names)}"
            )
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        return cls(**dict(m))

    def label(self) -> str:
        return f"{self.mission}/{self.metric}[{self.slice}]"


def _prepare(md: MetricData) -> tuple[PairedStatistic | str, np.ndarray, np.ndarray, int]:
    """The statistic (or why it is undefined), per-example seed means, and the seed count."""
    where = md.label()
    for key in ("mission", "metric", "slice", "family"):
        if not isinstance(getattr(md, key), str) or not getattr(md, key):
            raise ValueError(f"{where}: {key} must be a non-empty string")
    shape_c, shape_b = np.shape(md.candidate), np.shape(md.baseline)
    if shape_c != shape_b:
        raise ValueError(
            f"{where}: candidate and baseline must have the same shape (examples x seeds), "
            f"got {shape_c} and {shape_b}"
        )
    c = as_cells(md.candidate, f"{where} candidate")
    b = as_cells(md.baseline, f"{where} baseline")
    try:
        check_null(md.null_value)
        stat: PairedStatistic | str = PairedStatistic(
            c, b, q=parse_statistic(md.statistic), relative=md.relative, null_value=md.null_value
        )
    except UndefinedStatistic as exc:
        stat = f"{where}: {exc}"
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return stat, c.mean(axis=1), b.mean(axis=1), int(c.shape[1])


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def analyze(
    metrics: Sequence[MetricData | Mapping[str, Any]],
    *,
    confidence: float | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    method: str = "fast",
) -> list[dict[str, Any]]:
    """Paired bootstrap analysis of every metric, BH-adjusted within families; one dict per input.

    One significance level: the intervals are two-sided at ``confidence = 1 - alpha`` (the
    default); a ``confidence`` given with another value raises ValueError. Metrics with the same
    number of examples share one set of bootstrap draws (made from ``seed``), which is what scipy
    does per metric with a fixed seed, drawn once.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if confidence is None:
        confidence = 1.0 - alpha
    elif not math.isclose(confidence, 1.0 - alpha, abs_tol=1e-9):
        raise ValueError(
            f"confidence = {confidence} but alpha = {alpha}: the intervals and the tests use one "
            f"significance level, so confidence must be 1 - alpha = {1.0 - alpha:g}"
        )
    items = [
        m if isinstance(m, MetricData) else MetricData.from_mapping(m, f"metrics[{i}]")
        for i, m in enumerate(metrics)
    ]
    prepared = [_prepare(md) for md in items]
    seen: dict[tuple[Any, ...], int] = {}
    for i, md in enumerate(items):
        key = (md.mission, md.metric, md.slice, md.relative, md.statistic, md.null_value)
        if key in seen:
            raise ValueError(
                f"metrics[{i}] {md.label()}: the same comparison is already metrics[{seen[key]}]"
            )
        seen[key] = i

    # Group by number of examples: one set of draws per group.
    groups: dict[int, list[int]] = {}
    for i, (stat, *_rest) in enumerate(prepared):
        if isinstance(stat, PairedStatistic):
            groups.setdefault(stat.n, []).append(i)
    boot: list[Any] = [None] * len(items)
    for idxs in groups.values():
        res = bootstrap_many(
            [_stat(prepared[i][0]) for i in idxs],
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            method=method,
            null_values=[items[i].null_value for i in idxs],
        )
        for i, r in zip(idxs, res, strict=True):
            boot[i] = r

    families: dict[tuple[str, str, str], list[int]] = {}
    for i, md in enumerate(items):
        if boot[i] is not None:
            families.setdefault((md.mission, md.slice, md.family), []).append(i)
    p_adj = [1.0] * len(items)
    fam_size = [0] * len(items)
    for idxs in families.values():
        adjusted = bh_adjust([boot[i].p_value for i in idxs])
        for i, p in zip(idxs, adjusted, strict=True):
            p_adj[i] = float(p)
            fam_size[i] = len(idxs)

    out: list[dict[str, Any]] = []
    for i, md in enumerate(items):
        stat, c, b, n_seeds = prepared[i]
        r = boot[i]
        common = {
            "mission": md.mission, "metric": md.metric, "slice": md.slice, "family": md.family,
            "statistic": md.statistic, "relative": bool(md.relative),
            "higher_is_better": bool(md.higher_is_better), "n": int(c.shape[0]),
            "n_seeds": n_seeds, "confidence": float(confidence),
            "null_value": float(md.null_value), "method": method,
            "n_resamples": int(n_resamples), "seed": int(seed), "alpha": float(alpha),
        }  # fmt: skip
        if not isinstance(stat, PairedStatistic):
            out.append({**dict.fromkeys(RESULT_KEYS), **common, "error": stat})
            continue
        diff = c - b
        sd = float(np.std(diff, ddof=1))
        mean_c, mean_b = float(np.mean(c)), float(np.mean(b))
        mean_diff = float(diff[0]) if np.all(diff == diff[0]) else float(np.mean(diff))
        significant = p_adj[i] < alpha
        # Descriptive: which system the unadjusted two-sided test of "no change" (0, not the
        # null) finds better. Away from degeneracy that is the CI excluding 0 (interval
        # inversion); a degenerate bootstrap has a zero-width CI, so the exact sign test decides.
        if r.degenerate:
            p0 = sign_test_pvalue(stat.null_residuals(0.0), stat.residual_scale(0.0))
            rejects = p0 < 1.0 - confidence and r.estimate != 0
            above = r.estimate > 0
        else:
            rejects, above = r.low > 0 or r.high < 0, r.low > 0
        if rejects:
            favours = "candidate" if above == md.higher_is_better else "baseline"
        else:
            favours = "neither"
        tc, tb = stat.values()
        out.append(
            {
                **dict.fromkeys(RESULT_KEYS),
                **common,
                "estimate": float(r.estimate),
                "ci_low": float(r.low),
                "ci_high": float(r.high),
                "p_value": float(r.p_value),
                "p_value_method": "exact_sign_test" if r.degenerate else "interval_inversion",
                "p_adjusted": p_adj[i],
                "family_size": fam_size[i],
                "significant": bool(significant),
                "favours": favours,
                "se": float(r.se),
                "mean_diff": mean_diff,
                "sd_diff": sd,
                "effect_size_dz": _num(mean_diff / sd) if sd > 0 else None,
                "relative_change": _num(mean_c / mean_b - 1.0) if mean_b != 0 else None,
                "baseline_mean": mean_b,
                "candidate_mean": mean_c,
                "baseline_value": tb,
                "candidate_value": tc,
                "degenerate": bool(r.degenerate),
                "continuity": float(r.continuity),
                "error": None,
            }
        )
    return out


def _stat(s: PairedStatistic | str) -> PairedStatistic:
    assert isinstance(s, PairedStatistic)
    return s
