"""configs/gates_bem2.yaml for Mission B: the absolute gates judge the worst seed."""

from __future__ import annotations

from pathlib import Path

from bem_tasks.gates import evaluate_gates, load_gates

GATES = Path(__file__).resolve().parents[2] / "configs" / "gates_bem2.yaml"


def _outcomes(time_to_fix: list[float], rollback_count: list[float]) -> dict[str, str]:
    decision = evaluate_gates(
        "mission_b",
        load_gates(GATES),
        [],  # no comparative result: aggregate_improvement stays missing, not under test here
        {"time_to_fix": time_to_fix, "rollback_count": rollback_count},
    )
    return {o.gate: o.status for o in decision.gates}


def test_one_slow_or_rolled_back_seed_fails_the_absolute_gates() -> None:
    good = _outcomes([300.0, 900.0], [0.0, 0.0])
    assert (good["time_to_fix"], good["rollback_count"]) == ("passed", "passed")
    # a seed mean of 700 would pass; the worst seed (1200, e.g. a censoring bound) must not
    bad = _outcomes([200.0, 1200.0], [0.0, 1.0])
    assert (bad["time_to_fix"], bad["rollback_count"]) == ("failed", "failed")
    assert good["aggregate_improvement"] == "missing"
