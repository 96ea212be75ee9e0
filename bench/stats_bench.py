"""Statistics benchmark: the full paired analysis vs scipy.stats.bootstrap called per metric.

Builds 20 metrics x 5,000 paired examples x 5 seeds (binary EM-like, bounded F1-like, skewed
scores, and latency-like metrics analysed as relative changes of the mean and of the p95), then

* full:  ``bem_tasks.stats.analyze`` (fast BCa: shared draws, closed-form jackknife; plus p-values,
         BH within families and effect sizes) with 10,000 resamples;
* naive: ``scipy.stats.bootstrap(..., method="BCa")`` once per metric on the same data with the
         same seed and resamples: per-example seed means for means (BCa), and for the p95 the
         Harrell-Davis p95 of the pooled example x seed latencies of the resampled examples
         (scipy resamples example indices; BCa, its jackknife leaving one example out).

Prints both times, the ratio and the largest difference between the two sets of CI bounds (also
in units of the bootstrap standard error, the scale of the Monte Carlo error). Not a test; run:

    .venv/bin/python bench/stats_bench.py
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.special import betainc

from bem_tasks.stats import analyze


def make_metrics(n: int, seeds: int, count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Synthetic paired metrics with known structure (what a mission's evaluate phase writes)."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        kind = ("binary", "bounded", "skewed", "latency_mean", "latency_p95")[i % 5]
        spec: dict[str, Any] = {
            "mission": "bench",
            "metric": f"{kind}_{i}",
            "slice": "slice_b",
            "family": ("performance", "system")[kind.startswith("latency")],
        }
        if kind == "binary":
            base = (rng.random((n, 1)) < 0.55) & (rng.random((n, seeds)) < 0.9)
            flip = rng.random((n, seeds)) < 0.05
            cand, base_v = np.where(flip, 1.0, base.astype(float)), base.astype(float)
        elif kind == "bounded":
            base_v = np.clip(rng.beta(2, 2, (n, 1)) + rng.normal(0, 0.05, (n, seeds)), 0, 1)
            cand = np.clip(base_v + rng.normal(0.01 * (i % 3), 0.1, (n, seeds)), 0, 1)
        elif kind == "skewed":
            base_v = rng.gamma(2.0, 1.0, (n, 1)) + rng.normal(0, 0.2, (n, seeds))
            cand = base_v + rng.exponential(0.3, (n, seeds)) - 0.25
        else:
            base_v = rng.lognormal(3.0, 0.4, (n, 1)) * rng.lognormal(0, 0.05, (n, seeds))
            cand = base_v * rng.lognormal(0.03, 0.08, (n, seeds))
            spec.update(relative=True, higher_is_better=False)
            if kind == "latency_p95":
                spec["statistic"] = "p95"
        spec.update(candidate=cand, baseline=base_v)
        out.append(spec)
    return out


def naive_ci(spec: dict[str, Any], n_resamples: int, seed: int) -> tuple[float, float]:
    """scipy.stats.bootstrap computing what analyze() computes, the path analyze() replaces."""
    cand, base = np.asarray(spec["candidate"]), np.asarray(spec["baseline"])
    c, b = cand.mean(axis=1), base.mean(axis=1)
    if not spec.get("relative"):
        res = sps.bootstrap((c - b,), np.mean, n_resamples=n_resamples, rng=seed, method="BCa")
    elif spec.get("statistic") == "p95":
        # Harrell-Davis p95 of every seed of the resampled examples (scipy resamples example
        # indices), BCa interval (the jackknife calls it on n - 1 examples)
        def weights(cells: int) -> np.ndarray:
            return np.diff(
                betainc(0.95 * (cells + 1), 0.05 * (cells + 1), np.linspace(0, 1, cells + 1))
            )

        def pooled(ix: np.ndarray, axis: int = -1) -> np.ndarray:
            ix = np.moveaxis(ix, axis, -1)
            w = weights(ix.shape[-1] * cand.shape[1])
            tc = np.sort(cand[ix].reshape(*ix.shape[:-1], -1), axis=-1) @ w
            tb = np.sort(base[ix].reshape(*ix.shape[:-1], -1), axis=-1) @ w
            return tc / tb - 1.0

        res = sps.bootstrap(
            (np.arange(c.shape[0]),), pooled, n_resamples=n_resamples, rng=seed,
            method="BCa", batch=200,  # (batch, examples, seeds) copies stay ~40 MB
        )  # fmt: skip
    else:

        def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean(x, axis=axis) / np.mean(y, axis=axis) - 1.0

        res = sps.bootstrap(
            (c, b), ratio, paired=True, n_resamples=n_resamples, rng=seed, method="BCa"
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--metrics", type=int, default=20)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    metrics = make_metrics(args.examples, args.seeds, args.metrics, np.random.default_rng(2024))
    print(
        f"{args.metrics} metrics x {args.examples} examples x {args.seeds} seeds, "
        f"{args.resamples} resamples; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} (other work on the machine slows both paths)"
    )

    # Import statsmodels/scipy.stats once outside the timings (a one-off cost of any process).
    analyze(make_metrics(20, 2, 2, np.random.default_rng(0)), n_resamples=100)
    sps.bootstrap((np.arange(10.0),), np.mean, n_resamples=100, rng=0)

    t0 = time.perf_counter()
    results = analyze(metrics, n_resamples=args.resamples, seed=args.seed)
    full_s = time.perf_counter() - t0
    print(f"full analysis (analyze, fast BCa + p-values + BH): {full_s:.2f} s")

    t0 = time.perf_counter()
    naive = []
    for spec in metrics:
        naive.append(naive_ci(spec, args.resamples, args.seed))
        print(f"  naive {spec['metric']:<16} {time.perf_counter() - t0:7.1f} s", flush=True)
    naive_s = time.perf_counter() - t0
    print(f"naive (scipy.stats.bootstrap BCa per metric): {naive_s:.2f} s")

    print(f"{'metric':<16} {'fast CI':>30} {'scipy CI':>30} {'max |diff|':>11} {'in SE':>8}")
    max_diff = max_se = 0.0
    for r, (lo, hi) in zip(results, naive, strict=True):
        diff = max(abs(r["ci_low"] - lo), abs(r["ci_high"] - hi))
        in_se = diff / r["se"] if r["se"] > 0 else 0.0
        max_diff, max_se = max(max_diff, diff), max(max_se, in_se)
        fast = f"[{r['ci_low']:.6g}, {r['ci_high']:.6g}]"
        print(
            f"{r['metric']:<16} {fast:>30} {f'[{lo:.6g}, {hi:.6g}]':>30} {diff:11.3g} {in_se:8.3g}"
        )
    speedup = naive_s / full_s
    print(f"largest CI-bound difference: {max_diff:.3g} ({max_se:.3g} bootstrap SE)")
    print(
        f"stats_bench: full_s={full_s:.2f} naive_s={naive_s:.2f} speedup={speedup:.1f} "
        f"max_ci_diff={max_diff:.3g}"
    )


if __name__ == "__main__":
    main()
