"""Simulations with known truth: CI coverage and the false discovery proportion under BH.

Fixed seeds, sized to run in seconds on 2 cores through the fast path.
"""

from __future__ import annotations

import numpy as np

from bem_tasks.stats import MetricData, analyze, paired_bca


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
