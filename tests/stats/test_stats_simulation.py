"""Simulations with known truth: CI coverage and the false discovery proportion under BH.

Fixed seeds, sized to run in seconds on 2 cores through the fast path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

from bem_tasks.gates import Gate, GatesConfig, MissionGates, analysis_specs, evaluate_gates
from bem_tasks.stats import MetricData, analyze, paired_bca
from bem_tasks.stats.statistic import parse_statistic


def test_bca_coverage_is_nominal_under_a_true_effect() -> None:
    # 1000 replications, n=60 paired examples with a true mean difference of 0.3. The binomial
    # SE of the coverage estimate is sqrt(.95 * .05 / 1000) = 0.0069, so [0.93, 0.97] is +-2.9 SE.
    rng = np.random.default_rng(20240601)
    true_effect, reps, n = 0.3, 1000, 60
    covered = 0
    for i in range(reps):
        diffs = rng.normal(true_effect, 1.0, size=n)
        low, high = paired_bca(diffs, n_resamples=1000, seed=i)
        covered += low <= true_effect <= high
    coverage = covered / reps
    assert 0.93 <= coverage <= 0.97, coverage


def test_cluster_bootstrap_coverage_with_seeds() -> None:
    # examples x seeds with an example effect shared by all seeds (the cluster) plus seed noise
    rng = np.random.default_rng(7)
    true_effect, reps, n, seeds = 0.2, 400, 60, 3
    covered = 0
    for i in range(reps):
        example = rng.normal(true_effect, 0.8, size=(n, 1))
        diffs = example + rng.normal(0.0, 1.0, size=(n, seeds))
        low, high = paired_bca(diffs, n_resamples=1000, seed=i)
        covered += low <= true_effect <= high
    # SE at 400 reps is 0.011; the band is about +-3 SE
    assert 0.915 <= covered / reps <= 0.985


def test_bh_false_discovery_proportion_is_controlled() -> None:
    # 200 runs of 20 metrics: 10 true nulls and 10 real effects (d_z = 0.5). BH at q = 0.05
    # controls FDR at q * m0 / m = 0.025 for independent tests; average FDP must stay <= 0.05.
    rng = np.random.default_rng(99)
    runs, n, m0, m1 = 200, 60, 10, 10
    fdp, discoveries_of_effects = [], []
    for run in range(runs):
        metrics = []
        for j in range(m0 + m1):
            base = rng.normal(0.0, 1.0, size=n)
            effect = 0.5 if j >= m0 else 0.0
            cand = base + rng.normal(effect, 1.0, size=n)
            metrics.append(MetricData("sim", f"metric_{j}", "slice_b", "performance", cand, base))
        results = analyze(metrics, n_resamples=1000, seed=run, alpha=0.05)
        rejected = np.array([r["significant"] for r in results])
        false = int(rejected[:m0].sum())
        fdp.append(false / max(1, int(rejected.sum())))
        discoveries_of_effects.append(int(rejected[m0:].sum()))
    assert np.mean(fdp) <= 0.05, np.mean(fdp)
    # and the procedure is not vacuous: with 80% power per test most effects are found
    assert np.mean(discoveries_of_effects) >= 6.0


# ---------------------------------------------------------------- seeds, quantiles, small n
#
# Latency-like data with a known truth: log latency = 3 + example effect (sd 0.3) + seed noise
# (sd 0.1) for the baseline; the candidate adds delta + its own noise (sd `su`) per example and
# seed. Every cell is lognormal, so the pooled (example x seed) quantile of each system and the
# mean are known in closed form, and so is the relative change the gates test.
SA, SS = 0.3, 0.1


def _latencies(
    rng: np.random.Generator, n: int, seeds: int, delta: float, su: float
) -> tuple[np.ndarray, np.ndarray]:
    log_b = 3.0 + rng.normal(0, SA, (n, 1)) + rng.normal(0, SS, (n, seeds))
    return np.exp(log_b + delta + rng.normal(0, su, (n, seeds))), np.exp(log_b)


def _true_relative(statistic: str, delta: float, su: float) -> float:
    sd_b = np.sqrt(SA**2 + SS**2)
    sd_c = np.sqrt(SA**2 + SS**2 + su**2)
    if statistic == "mean":
        return float(np.exp(delta + (sd_c**2 - sd_b**2) / 2) - 1)
    z = norm.ppf(parse_statistic(statistic))
    return float(np.exp(delta + z * (sd_c - sd_b)) - 1)


@pytest.mark.parametrize("su", [0.3, 0.1])
def test_coverage_of_relative_mean_and_pooled_quantiles_with_seeds(su: float) -> None:
    # n = 500 examples x 3 seeds, relative change of the mean, the median and the p95 of the
    # pooled example x seed latencies (BCa intervals; quantiles: Harrell-Davis estimates).
    # Issue 10's target: coverage 95% +- 1.5%, asserted as [0.935, 0.965].
    # Monte Carlo error: 800 replications give a binomial SE of sqrt(.95 * .05 / 800) = 0.0077
    # for an observed coverage; 500 resamples per interval (the endpoint's own Monte Carlo error
    # moved coverage by < 0.5% against 1000 resamples: 93.6/93.1% p95, 95.9/94.3% median at
    # su = 0.1, 95.0/95.1% and 94.8/95.1% at su = 0.3, on two data seeds). Measured here:
    # su = 0.3: mean 96.0%, median 94.75%, p95 95.0%; su = 0.1: mean 95.5%, median 95.9%, p95
    # 93.6%. The p95 in the nearly proportional design (su = 0.1) sits at the lower edge: 93.1%,
    # 93.6% and 93.9% on three data seeds (800, 800, 2000 replications), about 93.7% pooled.
    # su = 0.1 makes candidate and baseline nearly proportional per example, the hard case for a
    # quantile interval: the percentile interval of the same Harrell-Davis statistic covered
    # 97.4-98% there (its bootstrap sd is 10-15% larger than the estimator's); BCa's bias
    # correction brings it to nominal. The replications of one statistic share one set of
    # bootstrap draws (as the metrics of one run do); the data differ in every replication.
    reps, n, seeds, delta = 800, 500, 3, 0.05
    stats = ("mean", "median", "p95")
    truth = {s: _true_relative(s, delta, su) for s in stats}
    rng = np.random.default_rng(31)
    metrics = []
    for r in range(reps):
        cand, base = _latencies(rng, n, seeds, delta, su)
        for s in stats:
            metrics.append(
                MetricData(f"rep{r}", "latency_ms", "slice_b", "system", cand, base,
                           higher_is_better=False, relative=True, statistic=s)
            )  # fmt: skip
    results = analyze(metrics, n_resamples=500, seed=5)
    for s in stats:
        rows = [x for x in results if x["statistic"] == s]
        assert len(rows) == reps and all(x["n_seeds"] == seeds for x in rows)
        coverage = np.mean([x["ci_low"] <= truth[s] <= x["ci_high"] for x in rows])
        assert 0.935 <= coverage <= 0.965, (s, su, coverage)


def _gate_config(gate: Gate, missions: int) -> GatesConfig:
    mg = MissionGates(candidate="c", baseline="b", families=[gate.family], gates=[gate])
    return GatesConfig(missions={f"rep{r}": mg for r in range(missions)})


def _promotion_rate(gate: Gate, reps: int, make: Any, seed: int = 0) -> tuple[float, int]:
    """Share of replications PROMOTED, and the number of examples, through analyze + gates."""
    cfg = _gate_config(gate, reps)
    specs = []
    for r in range(reps):
        cand, base = make()
        specs += [{**spec, "mission": f"rep{r}", "candidate": cand, "baseline": base}
                  for spec in analysis_specs(cfg, f"rep{r}")]  # fmt: skip
    results = analyze(specs, n_resamples=500, seed=seed)
    decisions = [evaluate_gates(f"rep{r}", cfg, results).decision for r in range(reps)]
    return decisions.count("PROMOTED") / reps, int(np.shape(specs[0]["candidate"])[0])


MEAN_GAIN = Gate(name="gain", metric="score", kind="superiority", op=">=", threshold=1.5,
                 family="performance")  # fmt: skip
P95_LATENCY = Gate(name="p95", metric="latency_ms", kind="non_inferiority", op="<=",
                   threshold=0.15, relative=True, statistic="p95", family="system")  # fmt: skip


# (gate statistic, examples, seeds), and the false promotion rate measured with 1000 replications
# where the test runs 300 (issue 10: <= 5%; a right interval gives alpha / 2 = 2.5%).
FALSE_PROMOTION_CASES = [
    ("mean", 5, 2),  # below min_examples (30): never decided
    ("mean", 30, 2),
    ("mean", 60, 2),
    ("p50", 30, 2),
    ("p95", 30, 1),  # below the tail rule (200 examples with 1 seed): never decided
    ("p95", 60, 2),  # below it (100 with 2 seeds)
    ("p95", 100, 2),
    ("p95", 200, 1),
    ("p95", 300, 2),  # Mission A's smoke size
    ("p99", 200, 1),  # below it (1000 with 1 seed)
    ("p99", 500, 2),
    ("p99", 1000, 1),
]


@pytest.mark.parametrize(("statistic", "n", "seeds"), FALSE_PROMOTION_CASES)
def test_false_promotion_rate_on_the_threshold_is_at_most_5_percent(
    statistic: str, n: int, seeds: int
) -> None:
    # The true effect sits exactly on the gate's threshold, so every PROMOTED is false. A gate
    # passes by chance at most alpha / 2 = 2.5% when the interval is right; the bound asserted
    # is issue 10's 5% (about 3 binomial SEs above 2.5% at 300 replications). Latencies are the
    # nearly proportional design (candidate noise sd 0.1), scores normal with an example effect.
    reps = 300
    rng = np.random.default_rng(11)
    if statistic == "mean":
        gate = MEAN_GAIN

        def make() -> tuple[np.ndarray, np.ndarray]:
            base = rng.normal(50, 10, (n, seeds))
            return base + rng.normal(1.5, 4.0, (n, 1)) + rng.normal(0, 2.0, (n, seeds)), base

    else:
        gate = P95_LATENCY.model_copy(update={"statistic": statistic})
        # delta such that the true pooled quantile ratio is exactly +15%
        su, q = 0.1, parse_statistic(statistic)
        delta = float(
            np.log(1.15) - norm.ppf(q) * (np.sqrt(SA**2 + SS**2 + su**2) - np.hypot(SA, SS))
        )
        assert _true_relative(statistic, delta, su) == pytest.approx(0.15)

        def make() -> tuple[np.ndarray, np.ndarray]:
            return _latencies(rng, n, seeds, delta, su)

    rate, _ = _promotion_rate(gate, reps, make)
    assert rate <= 0.05, (statistic, n, seeds, rate)
    if n < gate.required_examples(seeds):
        assert rate == 0.0
