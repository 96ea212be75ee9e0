"""Promotion gates: the shipped config, gate logic on hand-made results, report, registry."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bem_tasks.config.loader import ConfigError
from bem_tasks.gates import (
    Decision,
    Gate,
    GatesConfig,
    MissionGates,
    analysis_specs,
    error_decision,
    evaluate_gates,
    load_gates,
    promote,
    render_report_md,
)
from bem_tasks.stats import analyze
from bem_tasks.stats.power import achieved_power, n_for_margin

ROOT = Path(__file__).resolve().parents[2]
GATES_FILE = ROOT / "configs" / "gates_bem2.yaml"
# Mission A's gated metrics by gate name: the gates are defined by the mission (e.g. latency per
# generated token), the statistics tests only need to feed them.
A_METRIC = {g.name: g.metric for g in load_gates(GATES_FILE).missions["mission_a"].gates}
LAT, PLAN, KV = A_METRIC["latency_p95"], A_METRIC["plan_length"], A_METRIC["kv_hit_ratio"]


# ---------------------------------------------------------------- the shipped gates file


def test_shipped_gates_cover_every_mission_target() -> None:
    cfg = load_gates(GATES_FILE)
    assert sorted(cfg.missions) == [f"mission_{m}" for m in "abcde"]
    names = {m: {g.name: g for g in mg.gates} for m, mg in cfg.missions.items()}
    a = names["mission_a"]
    assert set(a) == {"em_gain", "f1_gain", "latency_p50", "latency_p95", "plan_length",
                      "kv_hit_ratio"}  # fmt: skip
    assert (a["em_gain"].metric, a["f1_gain"].metric) == ("em", "f1")
    assert a["latency_p50"].metric == a["latency_p95"].metric == LAT
    # em / f1 are per-example points (0..100), so +1.5 points is 1.5
    assert (a["em_gain"].kind, a["em_gain"].op, a["em_gain"].threshold) == (
        "superiority",
        ">=",
        1.5,
    )
    assert a["f1_gain"].threshold == 1.5
    for p in ("p50", "p95"):
        g = a[f"latency_{p}"]
        assert (g.kind, g.relative, g.statistic, g.op, g.threshold) == (
            "non_inferiority", True, p, "<=", 0.15
        )  # fmt: skip
    assert (a["plan_length"].kind, a["plan_length"].op, a["plan_length"].threshold) == (
        "absolute",
        "<=",
        3,
    )
    kv = a["kv_hit_ratio"]  # router's KV-hit >= 1.0x the baseline's, up to a stated margin
    assert (kv.kind, kv.relative, kv.op) == ("non_inferiority", True, ">=")
    assert -0.05 <= kv.threshold <= 0.0
    assert cfg.missions["mission_a"].candidate == "router"
    assert cfg.missions["mission_a"].baseline == "baseline"
    b = names["mission_b"]
    assert (b["time_to_fix"].op, b["time_to_fix"].threshold) == ("<=", 1000)
    assert (b["aggregate_improvement"].relative, b["aggregate_improvement"].threshold) == (
        True,
        0.01,
    )
    assert (b["rollback_count"].op, b["rollback_count"].threshold) == ("<=", 0)
    c = names["mission_c"]
    assert (c["violation_reduction"].relative, c["violation_reduction"].threshold) == (True, -0.30)
    assert c["em_drop"].threshold == c["f1_drop"].threshold == -1.0
    assert (c["latency"].threshold, c["orthogonality"].threshold) == (0.10, 0.95)
    d = names["mission_d"]
    assert (d["rrs_up"].op, d["ldc_down"].op) == (">", "<")
    assert d["bleu_loss"].threshold == d["chrf_loss"].threshold == -5.0
    e = names["mission_e"]
    assert (e["beyond_window"].kind, e["beyond_window"].op, e["beyond_window"].threshold) == (
        "superiority", ">", 0.0
    )  # fmt: skip
    assert (e["perplexity_spike"].threshold, e["latency"].threshold) == (1.2, 0.15)
    for mg in cfg.missions.values():
        for g in mg.gates:
            assert g.slice == "slice_b"  # the gatekeeper slice


def test_analysis_specs_test_the_gate_thresholds() -> None:
    cfg = load_gates(GATES_FILE)
    specs = analysis_specs(cfg, "mission_a")
    by = {(s["metric"], s["statistic"]): s for s in specs}
    assert set(by) == {
        ("em", "mean"), ("f1", "mean"), (LAT, "p50"), (LAT, "p95"), (KV, "mean"),
    }  # fmt: skip
    assert by[("em", "mean")]["null_value"] == 1.5
    assert by[(KV, "mean")]["relative"] is True
    assert by[(LAT, "p95")] == {
        "mission": "mission_a", "metric": LAT, "slice": "slice_b", "family": "system",
        "relative": True, "statistic": "p95", "higher_is_better": False, "null_value": 0.15,
    }  # fmt: skip
    with pytest.raises(ValueError, match="no gates for mission 'nope'"):
        analysis_specs(cfg, "nope")


# ---------------------------------------------------------------- gate logic on fixtures


def _cfg(*gates: Gate) -> GatesConfig:
    mg = MissionGates(
        candidate="cand", baseline="base", families=["performance", "system"], gates=list(gates)
    )
    return GatesConfig(missions={"m": mg})


SUP = Gate(
    name="em_gain", metric="em", kind="superiority", op=">=", threshold=0.015, family="performance"
)
NI = Gate(
    name="latency", metric="latency_ms", kind="non_inferiority", op="<=", threshold=0.15,
    relative=True, family="system",
)  # fmt: skip
ABS = Gate(
    name="plan",
    metric="plan_length",
    kind="absolute",
    op="<=",
    threshold=3,
    statistic="max",
    family="performance",
)


def _res(
    gate: Gate, est: float, lo: float, hi: float, p_adj: float, *, n: int = 200, se: float = 0.01,
    family_size: int = 2,
) -> dict[str, Any]:  # fmt: skip
    return {
        "mission": "m", "metric": gate.metric, "slice": gate.slice, "family": gate.family,
        "statistic": gate.statistic, "relative": gate.relative, "estimate": est, "ci_low": lo,
        "ci_high": hi, "confidence": 0.95, "null_value": gate.threshold, "p_value": p_adj / 2,
        "p_adjusted": p_adj, "family_size": family_size, "n": n, "se": se,
    }  # fmt: skip


def test_superiority_pass_fail_and_underpowered() -> None:
    cfg = _cfg(SUP)
    ok = evaluate_gates("m", cfg, [_res(SUP, 0.05, 0.03, 0.07, 0.001)])
    assert ok.decision == "PROMOTED" and ok.gates[0].status == "passed"
    assert "lies above the threshold 0.015" in ok.gates[0].reason

    bad = evaluate_gates("m", cfg, [_res(SUP, -0.02, -0.03, 0.01, 0.001)])
    assert bad.decision == "REJECTED" and bad.gates[0].status == "failed"
    assert "entirely below" in bad.gates[0].reason

    est, se, n = 0.02, 0.01, 200
    unsure = evaluate_gates("m", cfg, [_res(SUP, est, 0.001, 0.039, 0.6, n=n, se=se)])
    o = unsure.gates[0]
    assert unsure.decision == "INSUFFICIENT_EVIDENCE" and o.status == "underpowered"
    sd_unit, delta = se * math.sqrt(n), est - 0.015
    assert o.n_needed == n_for_margin(sd_unit, delta, power=0.8, alpha=0.05 / 2)
    assert o.achieved_power == pytest.approx(achieved_power(delta / sd_unit, n, 0.05 / 2))
    assert "straddles the threshold" in o.reason and f"about {o.n_needed} examples" in o.reason
    assert o.n_needed is not None and o.n_needed > n


def test_ci_clear_of_threshold_but_not_significant_after_bh_is_underpowered() -> None:
    d = evaluate_gates("m", _cfg(SUP), [_res(SUP, 0.05, 0.016, 0.08, 0.07)])
    assert d.gates[0].status == "underpowered"
    assert "BH-adjusted p = 0.07 >= 0.05" in d.gates[0].reason


def test_non_inferiority_boundary_and_strictness() -> None:
    at_margin = evaluate_gates("m", _cfg(NI), [_res(NI, 0.10, 0.05, 0.15, 0.03)])
    assert at_margin.gates[0].status == "passed"  # "<=" includes the margin itself
    strict = NI.model_copy(update={"op": "<"})
    on_strict = evaluate_gates("m", _cfg(strict), [_res(strict, 0.10, 0.05, 0.15, 0.03)])
    assert on_strict.gates[0].status == "underpowered"  # "<" does not
    over = evaluate_gates("m", _cfg(NI), [_res(NI, 0.22, 0.1501, 0.3, 0.001)])
    assert over.gates[0].status == "failed"
    assert "+15.00%" in over.gates[0].reason  # relative thresholds are shown in percent


def test_estimate_on_failing_side_says_so() -> None:
    d = evaluate_gates("m", _cfg(NI), [_res(NI, 0.17, 0.12, 0.22, 0.4)])
    assert d.gates[0].status == "underpowered"
    assert "on the failing side" in d.gates[0].reason


def test_absolute_gates_and_missing_measurements() -> None:
    cfg = _cfg(SUP, ABS)
    res = [_res(SUP, 0.05, 0.03, 0.07, 0.001)]
    ok = evaluate_gates("m", cfg, res, {"plan_length": np.array([1, 2, 3, 3])})
    assert ok.decision == "PROMOTED"
    assert (ok.gates[1].observed, ok.gates[1].n) == (3.0, 4)
    too_long = evaluate_gates("m", cfg, res, {"plan_length": [[1, 2], [4, 3]]})
    assert too_long.decision == "REJECTED" and too_long.gates[1].status == "failed"
    assert "max(plan_length) = 4 violates <= 3" in too_long.gates[1].reason
    assert evaluate_gates("m", cfg, res, {"plan_length": 2.5}).gates[1].status == "passed"
    missing = evaluate_gates("m", cfg, [], {})
    assert missing.decision == "INSUFFICIENT_EVIDENCE"
    assert [o.status for o in missing.gates] == ["missing", "missing"]
    assert "no property 'plan_length'" in missing.gates[1].reason
    with pytest.raises(ValueError, match="NaN"):
        evaluate_gates("m", cfg, res, {"plan_length": [1.0, float("nan")]})


def test_one_failure_rejects_even_with_other_gates_unresolved() -> None:
    cfg = _cfg(SUP, NI)
    d = evaluate_gates("m", cfg, [_res(SUP, 0.02, 0.0, 0.04, 0.5), _res(NI, 0.3, 0.2, 0.4, 0.001)])
    assert d.decision == "REJECTED"
    assert d.summary == "failed: latency; not resolved: em_gain"


def test_result_testing_another_null_is_an_error() -> None:
    r = _res(SUP, 0.05, 0.03, 0.07, 0.001)
    r["null_value"] = 0.0
    with pytest.raises(ValueError, match="tested at the gate threshold 0.015.*analysis_specs"):
        evaluate_gates("m", _cfg(SUP), [r])


# ---------------------------------------------------------------- end to end on real statistics


def _mission_a_data(
    n: int, em_gain: float, slow: float, seed: int = 0, kv_gain: float = 0.4
) -> dict[str, Any]:
    """Per-example paired values in mission A's units: EM/F1 in points (0..100)."""
    rng = np.random.default_rng(seed)
    em_b = (rng.random((n, 2)) < 0.5).astype(float)
    em_c = np.where(rng.random((n, 2)) < em_gain, 1.0, em_b)
    f1_b = rng.random((n, 2))
    f1_c = np.clip(f1_b + em_gain * 0.6 + rng.normal(0, 0.05, (n, 2)), 0, 1)
    lat_b = rng.lognormal(3.0, 0.3, (n, 2))
    lat_c = lat_b * rng.lognormal(slow, 0.05, (n, 2))
    kv_b = rng.uniform(0.2, 0.4, (n, 2))
    kv_c = np.clip(kv_b + kv_gain + rng.normal(0, 0.02, (n, 2)), 0, 1)
    return {
        "em": (100 * em_c, 100 * em_b),
        "f1": (100 * f1_c, 100 * f1_b),
        LAT: (lat_c, lat_b),
        KV: (kv_c, kv_b),
    }


def _run_mission_a(
    data: dict[str, Any], props: dict[str, Any]
) -> tuple[Decision, list[dict[str, Any]]]:
    cfg = load_gates(GATES_FILE)
    specs = analysis_specs(cfg, "mission_a")
    for s in specs:
        s["candidate"], s["baseline"] = data[s["metric"]]
    results = analyze(specs, n_resamples=1000)
    return evaluate_gates("mission_a", cfg, results, props), results


def test_end_to_end_promoted_and_rejected() -> None:
    props = {PLAN: np.full(300, 3)}
    good, results = _run_mission_a(_mission_a_data(300, em_gain=0.2, slow=0.01), props)
    assert good.decision == "PROMOTED", render_report_md([good])
    slow, _ = _run_mission_a(_mission_a_data(300, em_gain=0.2, slow=0.4), props)
    assert slow.decision == "REJECTED"
    assert {o.gate for o in slow.gates if o.status == "failed"} == {"latency_p50", "latency_p95"}
    leaky, _ = _run_mission_a(_mission_a_data(300, 0.2, 0.01, kv_gain=-0.1), props)
    assert leaky.decision == "REJECTED"
    assert {o.gate for o in leaky.gates if o.status == "failed"} == {"kv_hit_ratio"}
    too_long = {PLAN: np.r_[np.full(299, 3), 4]}
    assert _run_mission_a(_mission_a_data(300, 0.2, 0.01), too_long)[0].decision == "REJECTED"
    json.dumps(good.to_json(), allow_nan=False)


def test_report_lists_every_gate_and_reported_only_results(tmp_path: Path) -> None:
    props = {PLAN: np.full(100, 2)}
    decision, results = _run_mission_a(_mission_a_data(100, em_gain=0.02, slow=0.0), props)
    rng = np.random.default_rng(1)
    extra = analyze(
        [{"mission": "mission_a", "metric": "flip_rate", "slice": "slice_a", "family": "performance",
          "candidate": rng.random(50), "baseline": rng.random(50)}],
        n_resamples=200,
    )  # fmt: skip
    md = render_report_md([decision], results=results + extra)
    assert md.startswith("# Promotion report")
    assert f"## mission_a: {decision.decision}" in md
    for o in decision.gates:
        assert f"| {o.gate} |" in md
    assert "## Reported only (no gate)" in md and "flip_rate" in md
    assert "n needed" in md


# ---------------------------------------------------------------- registry


def _promoted(mission: str = "mission_a") -> Decision:
    cfg = _cfg(SUP)
    d = evaluate_gates("m", cfg, [_res(SUP, 0.05, 0.03, 0.07, 0.001)])
    return d.model_copy(update={"mission": mission})


def test_promote_records_current_and_history(tmp_path: Path) -> None:
    reg = tmp_path / "registry" / "models.json"
    e1 = promote(reg, "mission_a", "run1", "/models/a1", _promoted(), extra={"sha256": "abc"})
    promote(reg, "mission_a", "run2", "/models/a2", _promoted())
    promote(reg, "mission_a", "run2", "/models/a2b", _promoted())  # rerun of the same task
    data = json.loads(reg.read_text())
    slot = data["missions"]["mission_a"]
    assert [e["run_id"] for e in slot["history"]] == ["run1", "run2"]
    assert slot["current"]["model_path"] == "/models/a2b"
    assert e1["sha256"] == "abc" and e1["gates"] == {"em_gain": "passed"}
    assert not list(reg.parent.glob("*.tmp"))


def test_promote_refuses_what_was_not_promoted(tmp_path: Path) -> None:
    cfg = _cfg(SUP)
    rejected = evaluate_gates("m", cfg, [_res(SUP, -0.02, -0.03, -0.01, 0.001)])
    with pytest.raises(ValueError, match="was not promoted: REJECTED"):
        promote(tmp_path / "r.json", "m", "run1", "/x", rejected)
    with pytest.raises(ValueError, match="decision is for mission 'mission_a', not 'mission_b'"):
        promote(tmp_path / "r.json", "mission_b", "run1", "/x", _promoted())
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json:1: the registry is not valid JSON"):
        promote(tmp_path / "broken.json", "mission_a", "run1", "/x", _promoted())


def _promote_many(args: tuple[str, int]) -> None:
    reg, worker = args
    for k in range(5):
        promote(
            reg,
            f"mission_{'ab'[worker % 2]}",
            f"w{worker}-r{k}",
            f"/m/{worker}/{k}",
            _promoted(f"mission_{'ab'[worker % 2]}"),
        )


def test_concurrent_promotions_lose_nothing(tmp_path: Path) -> None:
    """8 processes x 5 promotions into one registry (flock around read-modify-write): all 40
    entries are there, and no temp file is left beside the registry."""
    reg = str(tmp_path / "models.json")
    with mp.get_context("fork").Pool(8) as pool:
        pool.map(_promote_many, [(reg, w) for w in range(8)])
    data = json.loads(Path(reg).read_text())
    runs = sorted(e["run_id"] for slot in data["missions"].values() for e in slot["history"])
    assert runs == sorted(f"w{w}-r{k}" for w in range(8) for k in range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.json", "models.json.lock"]


# ---------------------------------------------------------------- evidence, sidedness, errors


def test_too_few_examples_is_insufficient_evidence_whatever_the_ci() -> None:
    small = SUP.model_copy(update={"min_examples": 40})
    assert SUP.required_examples() == 30 and small.required_examples() == 40
    clear_win = _res(small, 0.05, 0.03, 0.07, 0.001, n=39)
    d = evaluate_gates("m", _cfg(small), [clear_win])
    assert d.decision == "INSUFFICIENT_EVIDENCE" and d.gates[0].status == "too_few_examples"
    assert "only 39 examples, fewer than min_examples = 40" in d.gates[0].reason
    clear_loss = _res(small, -0.05, -0.07, -0.03, 0.001, n=39)
    assert evaluate_gates("m", _cfg(small), [clear_loss]).gates[0].status == "too_few_examples"
    assert evaluate_gates("m", _cfg(small), [{**clear_win, "n": 40}]).decision == "PROMOTED"


def test_three_constant_differences_are_never_promoted() -> None:
    # The case: n=3, constant +2 points against a +1.5 gate. The bootstrap interval is
    # (2, 2); the old p-value was the floor 1/(B+1).
    gate = SUP.model_copy(update={"threshold": 1.5})
    spec = {**analysis_specs(_cfg(gate), "m")[0], "candidate": np.full(3, 2.0),
            "baseline": np.zeros(3)}  # fmt: skip
    (res,) = analyze([spec], n_resamples=1000)
    assert (res["ci_low"], res["ci_high"], res["p_value_method"]) == (2.0, 2.0, "exact_sign_test")
    assert res["p_value"] == pytest.approx(0.25)  # 2 * 0.5**3
    d = evaluate_gates("m", _cfg(gate), [res])
    assert d.decision == "INSUFFICIENT_EVIDENCE" and d.gates[0].status == "too_few_examples"
    # even with the minimum lowered to 3, the exact test keeps it from passing
    low = gate.model_copy(update={"min_examples": 3})
    d = evaluate_gates("m", _cfg(low), [res])
    assert d.decision == "INSUFFICIENT_EVIDENCE" and d.gates[0].status == "underpowered"
    assert "BH-adjusted p = 0.25 >= 0.05" in d.gates[0].reason
    assert "exact sign test" in d.gates[0].reason
    # and 30 such examples are conclusive: p = 2 * 0.5**30
    spec30 = {**spec, "candidate": np.full(30, 2.0), "baseline": np.zeros(30)}
    (res30,) = analyze([spec30], n_resamples=1000)
    assert evaluate_gates("m", _cfg(gate), [res30]).decision == "PROMOTED"


def test_min_examples_is_configured_per_comparative_gate(tmp_path: Path) -> None:
    import yaml

    doc = {
        "version": 1,
        "missions": {"m": {"candidate": "c", "baseline": "b", "families": ["performance"],
                           "gates": [{**SUP.model_dump(exclude_none=True), "min_examples": 100}]}},
    }  # fmt: skip
    p = tmp_path / "gates.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert load_gates(p).missions["m"].gates[0].required_examples() == 100
    doc["missions"]["m"]["gates"][0]["min_examples"] = 1
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"gates.0.min_examples: .*greater than or equal to 2"):
        load_gates(p)
    with pytest.raises(ValueError, match="min_examples applies to comparative gates"):
        Gate.model_validate({**ABS.model_dump(), "min_examples": 10})
    assert all(g.min_examples is None for mg in load_gates(GATES_FILE).missions.values()
               for g in mg.gates)  # fmt: skip


def test_every_seed_slower_at_p95_is_rejected_with_the_shipped_gates() -> None:
    # Per seed a different 10% of the examples is 27% slower: every seed's p95 is +27% against
    # a +15% gate. Averaging seeds first reported about +5% and promoted.
    n, seeds = 200, 5
    i, j = np.arange(n)[:, None], np.arange(seeds)[None, :]
    lat_b = 100.0 + 0.1 * (i % 7) + 0.01 * j
    lat_c = np.where(i % 10 == 2 * j, lat_b * 1.27, lat_b)
    per_seed = np.quantile(lat_c, 0.95, axis=0) / np.quantile(lat_b, 0.95, axis=0) - 1
    assert np.all(per_seed > 0.26)
    data = _mission_a_data(n, em_gain=0.3, slow=0.0)
    data = {k: (c[:, :1].repeat(seeds, 1), b[:, :1].repeat(seeds, 1)) for k, (c, b) in data.items()}
    data[LAT] = (lat_c, lat_b)
    d, results = _run_mission_a(data, {PLAN: np.full(n, 3)})
    p95 = next(o for o in d.gates if o.gate == "latency_p95")
    assert p95.status == "failed" and p95.observed is not None and p95.observed > 0.26
    assert d.decision == "REJECTED"


def test_an_empty_property_is_missing_not_an_error() -> None:
    d = evaluate_gates("m", _cfg(ABS), [], {"plan_length": np.array([])})
    assert d.decision == "INSUFFICIENT_EVIDENCE"
    assert (
        d.gates[0].status == "missing"
        and "property 'plan_length' has no values" in d.gates[0].reason
    )
    assert evaluate_gates("m", _cfg(ABS), [], {"plan_length": []}).gates[0].status == "missing"


def test_alpha_and_power_come_from_the_gates_file() -> None:
    strict = _cfg(SUP).model_copy(update={"alpha": 0.01, "power": 0.9})
    r = {**_res(SUP, 0.05, 0.03, 0.07, 0.02), "confidence": 0.99}
    d = evaluate_gates("m", strict, [r])
    assert (d.alpha, d.power) == (0.01, 0.9)
    assert d.gates[0].status == "underpowered"  # p_adj 0.02 passes at 0.05, not at 0.01
    assert "BH-adjusted p = 0.02 >= 0.01" in d.gates[0].reason
    with pytest.raises(TypeError):
        evaluate_gates("m", strict, [r], alpha=0.05)  # type: ignore[call-arg]


def test_statistics_at_another_confidence_cannot_be_judged() -> None:
    r = {**_res(SUP, 0.05, 0.03, 0.07, 0.001), "confidence": 0.9}
    with pytest.raises(ValueError, match=r"confidence 0.9, but the gates file's alpha = 0.05"):
        evaluate_gates("m", _cfg(SUP), [r])


def test_error_decision_is_reported_and_never_promoted(tmp_path: Path) -> None:
    cfg = _cfg(SUP)
    err = error_decision("m", cfg, "ValueError: broken records")
    assert (err.decision, err.error, err.candidate, err.gates) == (
        "ERROR", "ValueError: broken records", "cand", []
    )  # fmt: skip
    ok = evaluate_gates("m", cfg, [_res(SUP, 0.05, 0.03, 0.07, 0.001)])
    md = render_report_md([ok.model_copy(update={"mission": "other"}), err])
    assert "| m | **ERROR** |" in md and "## m: ERROR" in md and "broken records" in md
    assert "| other | **PROMOTED** | 1 | 0 | 0 | 0 | 0 |" in md
    with pytest.raises(ValueError, match="was not promoted: ERROR"):
        promote(tmp_path / "r.json", "m", "run1", "/x", err)


def test_report_states_the_sidedness() -> None:
    md = render_report_md([evaluate_gates("m", _cfg(SUP), [_res(SUP, 0.05, 0.03, 0.07, 0.001)])])
    assert "one-sided questions judged on two-sided 95% bootstrap BCa intervals" in md
    # says what each kind of gate uses
    assert "of the mean for mean gates, of the Harrell-Davis quantile of the pooled" in md
    assert "the exact sign test when every resample gives the same value" in md
    assert "at most alpha/2" in md


# ---------------------------------------------------------------- tails, rounding, zero baselines

P95 = Gate(name="p95", metric="latency_ms", kind="non_inferiority", op="<=", threshold=0.15,
           relative=True, statistic="p95", family="system")  # fmt: skip


def test_a_quantile_gate_needs_values_beyond_its_quantile() -> None:
    # examples x seeds x min(q, 1 - q) >= 10, never below min_examples
    assert [P95.required_examples(k) for k in (1, 2, 3)] == [200, 100, 67]
    p99 = P95.model_copy(update={"statistic": "p99"})
    assert (p99.required_examples(1), p99.required_examples(2)) == (1000, 500)
    p05 = P95.model_copy(update={"statistic": "p5"})
    assert p05.required_examples(1) == 200  # the lower tail alike
    median = P95.model_copy(update={"statistic": "median"})
    assert median.required_examples(1) == 30 and SUP.required_examples(1) == 30
    floor = P95.model_copy(update={"min_examples": 300})
    assert floor.required_examples(2) == 300  # min_examples stays the floor
    # a clear pass on 150 examples x 1 seed is too little for a p95; with 2 seeds it decides
    win = {**_res(P95, 0.01, -0.02, 0.05, 0.001, n=150), "n_seeds": 1}
    d = evaluate_gates("m", _cfg(P95), [win])
    assert d.gates[0].status == "too_few_examples" and d.decision == "INSUFFICIENT_EVIDENCE"
    assert "only 150 examples, fewer than a p95 gate needs examples x seeds x 0.05 >= 10" in (
        d.gates[0].reason
    )
    assert "200 examples with 1 seed(s) (min_examples = 30)" in d.gates[0].reason
    assert evaluate_gates("m", _cfg(P95), [{**win, "n_seeds": 2}]).decision == "PROMOTED"
    # Mission A's smoke (about 200-300 timed examples x 2 seeds) decides its p50 and p95 gates
    for name in ("latency_p50", "latency_p95"):
        g = next(g for g in load_gates(GATES_FILE).missions["mission_a"].gates if g.name == name)
        assert g.required_examples(2) <= 200


@pytest.mark.parametrize("op", ["<=", ">="])
def test_rounding_on_the_threshold_is_no_evidence(op: str) -> None:
    # Every candidate value is the baseline's + 0.1 up to float rounding, and the gate's
    # threshold is 0.1: the truth sits on the threshold. The residuals c - b - 0.1 are about
    # 1e-14 of either sign; counted as signs they gave p = 0.017 and a PROMOTED (<=) or
    # REJECTED (>=). They are ties: p = 1, and the gate is undecided either way.
    b = np.random.default_rng(0).uniform(0, 100, 40).round(1)
    c = b + 0.1
    kind = "non_inferiority" if op == "<=" else "superiority"
    gate = Gate(name="g", metric="x", kind=kind, op=op, threshold=0.1, family="performance")
    spec = {**analysis_specs(_cfg(gate), "m")[0], "candidate": c, "baseline": b}
    (res,) = analyze([spec], n_resamples=1000)
    assert res["degenerate"] and res["p_value_method"] == "exact_sign_test"
    assert res["p_value"] == 1.0
    d = evaluate_gates("m", _cfg(gate), [res])
    assert d.decision == "INSUFFICIENT_EVIDENCE", d.gates[0].reason
    assert "the estimate sits on the threshold" in d.gates[0].reason


def test_a_degenerate_ci_on_the_failing_side_needs_the_sign_test_to_fail() -> None:
    gate = SUP.model_copy(update={"threshold": 0.1, "min_examples": 5})
    spec = analysis_specs(_cfg(gate), "m")[0]
    # 5 constant differences of 0.05 against >= 0.1: CI (0.05, 0.05), sign test p = 2 / 32
    (few,) = analyze([{**spec, "candidate": np.full(5, 0.05), "baseline": np.zeros(5)}],
                     n_resamples=1000)  # fmt: skip
    assert few["p_value"] == pytest.approx(0.0625)
    o = evaluate_gates("m", _cfg(gate), [few]).gates[0]
    assert o.status == "underpowered" and "zero width on the failing side" in o.reason
    # 40 of them: p = 2 * 0.5**40, a conclusive fail
    (many,) = analyze([{**spec, "candidate": np.full(40, 0.05), "baseline": np.zeros(40)}],
                      n_resamples=1000)  # fmt: skip
    o = evaluate_gates("m", _cfg(gate), [many]).gates[0]
    assert o.status == "failed" and "exact sign test gives p = 1.82e-12 < 0.05" in o.reason


def test_an_all_zero_relative_baseline_is_that_gate_missing() -> None:
    # mission_c-like: no baseline violation at all, so a relative reduction is undefined; the
    # gate is missing with the reason and the mission's other gates are judged as usual.
    viol = Gate(name="violation_reduction", metric="violation", kind="superiority", op="<=",
                threshold=-0.30, relative=True, family="safety")  # fmt: skip
    em = Gate(name="em_drop", metric="em", kind="non_inferiority", op=">=", threshold=-1.0,
              family="performance")  # fmt: skip
    mg = MissionGates(candidate="c", baseline="b", families=["safety", "performance"],
                      gates=[viol, em])  # fmt: skip
    cfg = GatesConfig(missions={"m": mg})
    rng = np.random.default_rng(2)
    em_b = (rng.random(200) < 0.5) * 100.0
    data = {"violation": (np.zeros(200), np.zeros(200)), "em": (em_b, em_b.copy())}
    specs = [{**s, "candidate": data[s["metric"]][0], "baseline": data[s["metric"]][1]}
             for s in analysis_specs(cfg, "m")]  # fmt: skip
    results = analyze(specs, n_resamples=500)
    bad = next(r for r in results if r["metric"] == "violation")
    assert "needs a positive baseline mean, got 0" in bad["error"]
    assert bad["estimate"] is None and bad["p_adjusted"] is None
    good = next(r for r in results if r["metric"] == "em")
    assert good["error"] is None and good["family_size"] == 1
    d = evaluate_gates("m", cfg, results)
    assert d.decision == "INSUFFICIENT_EVIDENCE"
    by = {o.gate: o for o in d.gates}
    assert by["violation_reduction"].status == "missing"
    assert "needs a positive baseline mean" in by["violation_reduction"].reason
    assert by["em_drop"].status == "passed"  # identical EM: inside a 1-point margin
    md = render_report_md([d], results=results)
    assert "violation_reduction" in md


def test_absolute_quantile_gates_use_harrell_davis_like_comparative_ones() -> None:
    from scipy.stats.mstats import hdquantiles

    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    p90 = ABS.model_copy(update={"statistic": "p90", "threshold": 1000})
    o = evaluate_gates("m", _cfg(p90), [], {"plan_length": values}).gates[0]
    assert o.observed == pytest.approx(float(hdquantiles(values, [0.9])[0]))
    assert o.observed != pytest.approx(float(np.quantile(values, 0.9)))
