"""analyze(): result contents, families, relative changes, JSON, validation, forest plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats.mstats import hdquantiles

from bem_tasks.stats import (
    RESULT_KEYS,
    MetricData,
    analyze,
    bh_adjust,
    paired_bootstrap,
    plot_forest,
)
from bem_tasks.stats.plots import colour_key


def _metrics(n: int = 80, seeds: int = 3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    em_b = (rng.random((n, seeds)) < 0.5).astype(float)
    em_c = np.where(rng.random((n, seeds)) < 0.15, 1.0, em_b)
    f1_b = rng.random((n, seeds))
    f1_c = np.clip(f1_b + rng.normal(0.02, 0.1, (n, seeds)), 0, 1)
    lat_b = rng.lognormal(3.0, 0.3, (n, seeds))
    lat_c = lat_b * rng.lognormal(0.05, 0.1, (n, seeds))
    common = {"mission": "mission_a", "slice": "slice_b"}
    return [
        {**common, "metric": "em", "family": "performance", "candidate": em_c, "baseline": em_b},
        {**common, "metric": "f1", "family": "performance", "candidate": f1_c, "baseline": f1_b},
        {
            **common,
            "metric": "latency_ms",
            "family": "system",
            "candidate": lat_c,
            "baseline": lat_b,
            "relative": True,
            "higher_is_better": False,
            "null_value": 0.15,
        },
        {
            **common,
            "metric": "latency_ms",
            "family": "system",
            "candidate": lat_c,
            "baseline": lat_b,
            "relative": True,
            "statistic": "p95",
            "higher_is_better": False,
            "null_value": 0.15,
        },
        {
            **common,
            "slice": "slice_a",
            "metric": "em",
            "family": "performance",
            "candidate": em_c[:50],
            "baseline": em_b[:50],
        },
    ]


def test_results_have_every_key_and_are_strict_json() -> None:
    results = analyze(_metrics(), n_resamples=1000)
    assert len(results) == 5
    for r in results:
        assert tuple(r) == RESULT_KEYS
    json.dumps(results, allow_nan=False)


def test_known_answers_against_the_inputs() -> None:
    ms = _metrics()
    results = analyze(ms, n_resamples=1000, seed=3)
    em = results[0]
    c = ms[0]["candidate"].mean(axis=1)
    b = ms[0]["baseline"].mean(axis=1)
    assert (em["n"], em["n_seeds"]) == (80, 3)
    assert em["mean_diff"] == pytest.approx(np.mean(c - b))
    assert em["estimate"] == pytest.approx(np.mean(c - b))
    assert em["baseline_mean"] == pytest.approx(b.mean())
    assert em["candidate_mean"] == pytest.approx(c.mean())
    assert em["relative_change"] == pytest.approx(c.mean() / b.mean() - 1)
    assert em["effect_size_dz"] == pytest.approx(np.mean(c - b) / np.std(c - b, ddof=1))
    # The CI and p-value are paired_bootstrap's on the same data, seed and resamples.
    one = paired_bootstrap(ms[0]["candidate"], ms[0]["baseline"], n_resamples=1000, seed=3)
    # (the shared matrix product may sum in another order: equal to rounding)
    np.testing.assert_allclose(
        [em["ci_low"], em["ci_high"], em["p_value"]], [one.low, one.high, one.p_value], rtol=1e-12
    )

    lat, p95 = results[2], results[3]
    cl, bl = ms[2]["candidate"].mean(axis=1), ms[2]["baseline"].mean(axis=1)
    assert lat["estimate"] == pytest.approx(cl.mean() / bl.mean() - 1)
    assert lat["ci_low"] < lat["estimate"] < lat["ci_high"]
    # quantiles: Harrell-Davis over every example x seed value (80 x 3 = 240 latencies a system)
    hd_c = float(hdquantiles(ms[2]["candidate"].ravel(), [0.95])[0])
    hd_b = float(hdquantiles(ms[2]["baseline"].ravel(), [0.95])[0])
    assert p95["estimate"] == pytest.approx(hd_c / hd_b - 1)
    assert (p95["candidate_value"], p95["baseline_value"]) == pytest.approx((hd_c, hd_b))
    assert (p95["n"], p95["n_seeds"]) == (80, 3)
    assert [r["p_value_method"] for r in results] == ["interval_inversion"] * 5
    assert [r["continuity"] for r in results] == [0.0] * 5
    assert lat["null_value"] == 0.15
    # latency is clearly below +15%, and lower is better: the candidate is not slower by 15%
    assert lat["ci_high"] < 0.15 and lat["p_value"] < 0.05


def test_bh_is_applied_within_mission_slice_family() -> None:
    results = analyze(_metrics(), n_resamples=1000)
    perf_b = [r for r in results if r["family"] == "performance" and r["slice"] == "slice_b"]
    np.testing.assert_allclose(
        [r["p_adjusted"] for r in perf_b], bh_adjust([r["p_value"] for r in perf_b])
    )
    assert [r["family_size"] for r in results] == [2, 2, 2, 2, 1]
    # slice_a is its own family: its p-value is not adjusted with slice_b's
    assert results[4]["p_adjusted"] == results[4]["p_value"]


def test_scipy_method_gives_the_same_results_on_small_problems() -> None:
    ms = [m for m in _metrics() if m["metric"] != "em"]  # continuous metrics: no lattice ties
    fast = analyze(ms, n_resamples=1000, seed=2)
    ref = analyze(ms, n_resamples=1000, seed=2, method="scipy")
    for f, r in zip(fast, ref, strict=True):
        np.testing.assert_allclose(
            [f["ci_low"], f["ci_high"], f["p_value"]],
            [r["ci_low"], r["ci_high"], r["p_value"]],
            rtol=1e-9,
        )


def test_constant_metric_is_degenerate_and_identical_metric_is_null() -> None:
    n = 20
    same = np.arange(n, dtype=float)
    results = analyze(
        [
            MetricData("m", "shift", "s", "f", same + 2.0, same),
            MetricData("m", "same", "s", "f", same, same),
        ],
        n_resamples=500,
    )
    shift, ident = results
    assert (shift["ci_low"], shift["ci_high"], shift["degenerate"]) == (2.0, 2.0, True)
    assert shift["p_value_method"] == "exact_sign_test"
    assert shift["p_value"] == pytest.approx(2 * 0.5**20)  # 20 of 20 examples above 0
    assert shift["effect_size_dz"] is None and shift["favours"] == "candidate"
    assert (ident["estimate"], ident["p_value"], ident["favours"]) == (0.0, 1.0, "neither")


def test_favours_respects_direction() -> None:
    rng = np.random.default_rng(0)
    b = rng.lognormal(3, 0.2, 100)
    slower = analyze(
        [MetricData("m", "lat", "s", "system", b * 1.3, b, higher_is_better=False, relative=True)],
        n_resamples=500,
    )[0]
    assert slower["favours"] == "baseline"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"colour": "red"}, r"metrics\[0\]: unknown key\(s\) \['colour'\]"),
        ({"candidate": np.ones((80, 2))}, "same shape"),
        ({"statistic": "p200"}, r"mission_a/em\[slice_b\]: statistic must be"),
        ({"family": ""}, "family must be a non-empty string"),
        ({"null_value": float("nan")}, r"mission_a/em\[slice_b\]: null_value must be a finite"),
        ({"candidate": np.ones((80, 3)) * 1j}, "candidate: expected real numbers"),
    ],
)
def test_bad_metric_input(change: dict[str, Any], match: str) -> None:
    m = {**_metrics()[0], **change}
    with pytest.raises(ValueError, match=match):
        analyze([m], n_resamples=200)


def test_missing_key_is_named() -> None:
    m = dict(_metrics()[0])
    del m["baseline"]
    with pytest.raises(ValueError, match=r"metrics\[0\]: missing required key\(s\) \['baseline'\]"):
        analyze([m], n_resamples=200)


def test_nan_names_the_metric() -> None:
    m = dict(_metrics()[0])
    cand = m["candidate"].copy()
    cand[3, 1] = np.nan
    m["candidate"] = cand
    with pytest.raises(
        ValueError, match=r"mission_a/em\[slice_b\] candidate: 1 value\(s\) are NaN"
    ):
        analyze([m], n_resamples=200)


def test_duplicate_comparison_is_rejected() -> None:
    m = _metrics()[0]
    with pytest.raises(ValueError, match=r"metrics\[1\].*already metrics\[0\]"):
        analyze([m, m], n_resamples=200)


def test_forest_colour_follows_the_bh_adjusted_decision() -> None:
    row = {"ci_low": 0.01, "ci_high": 0.05, "null_value": 0.0, "higher_is_better": True,
           "alpha": 0.05, "p_value": 0.01, "p_adjusted": 0.01}  # fmt: skip
    assert colour_key(row) == "candidate"
    # the unadjusted CI excludes 0, but BH does not reject: grey, as the title's BH p says
    assert colour_key({**row, "p_adjusted": 0.08}) == "neither"
    assert colour_key({**row, "higher_is_better": False}) == "baseline"
    # a gated row tests its threshold: significantly below a +1.5 superiority threshold is red
    assert colour_key({**row, "null_value": 1.5, "ci_low": 0.2, "ci_high": 1.0}) == "baseline"
    # a stricter alpha recorded with the result is the one used
    assert colour_key({**row, "alpha": 0.005}) == "neither"
    # on real results: colour agrees with `significant` and the side of the null
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(80, 3))
    flat = {"mission": "mission_a", "slice": "slice_b", "metric": "noise", "family": "reported",
            "candidate": noise + rng.normal(0, 0.01, (80, 3)), "baseline": noise}  # fmt: skip
    results = analyze([*_metrics(), flat], n_resamples=300)
    assert [r["significant"] for r in results].count(False) >= 1  # both branches run
    assert [r["significant"] for r in results].count(True) >= 1
    for r in results:
        if not r["significant"]:
            assert colour_key(r) == "neither"
        else:
            better = (r["ci_low"] > r["null_value"]) == r["higher_is_better"]
            assert colour_key(r) == ("candidate" if better else "baseline")


def test_forest_plot_writes_a_png(tmp_path: Path) -> None:
    results = analyze(_metrics(), n_resamples=300)
    results[2]["threshold"] = 0.15
    out = plot_forest(results, tmp_path / "plots" / "forest.png", title="mission_a")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no results"):
        plot_forest([], tmp_path / "empty.png")


def test_one_significance_level_confidence_is_one_minus_alpha() -> None:
    m = _metrics()[:1]
    assert analyze(m, n_resamples=200, alpha=0.1)[0]["confidence"] == pytest.approx(0.9)
    assert analyze(m, n_resamples=200, alpha=0.05, confidence=0.95)[0]["confidence"] == 0.95
    with pytest.raises(ValueError, match=r"confidence = 0.9 but alpha = 0.05.*1 - alpha = 0.95"):
        analyze(m, n_resamples=200, confidence=0.9, alpha=0.05)


def test_favours_agrees_with_the_test_of_no_change() -> None:
    common = {"mission": "m", "metric": "x", "slice": "slice_b", "family": "performance"}
    # three constant differences: zero-width CI (2, 2), but the exact sign test gives p = 0.25
    (three,) = analyze([{**common, "candidate": np.full(3, 2.0), "baseline": np.zeros(3)}],
                       n_resamples=200)  # fmt: skip
    assert (three["ci_low"], three["p_value"], three["favours"]) == (2.0, 0.25, "neither")
    # forty of them: p = 2 * 0.5**40
    (forty,) = analyze([{**common, "candidate": np.full(40, 2.0), "baseline": np.zeros(40)}],
                       n_resamples=200)  # fmt: skip
    assert forty["favours"] == "candidate"
    # away from degeneracy: the CI excluding 0 is p < 1 - confidence at 0
    rng = np.random.default_rng(8)
    b = rng.normal(size=60)
    for shift, want in ((1.0, "candidate"), (0.0, "neither"), (-1.0, "baseline")):
        (r,) = analyze([{**common, "candidate": b + shift + rng.normal(0, 0.3, 60), "baseline": b}],
                       n_resamples=500)  # fmt: skip
        assert r["favours"] == want and (r["p_value"] < 0.05) == (want != "neither")
