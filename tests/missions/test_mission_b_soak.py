"""mission_b.soak on the micro run: the online learner continues on the replayed stream under
the online rules, and run_soak reports what happened (real chunks, real RSS samples)."""

from __future__ import annotations

import json

import pytest

from bem_tasks.missions import mission_b
from tests.missions.conftest_b import MicroB


def test_soak_continues_the_online_learner(micro_b: MicroB, tmp_path):
    ctx = micro_b.ctx("evaluate", tmp_path / "soak")
    report = mission_b.soak(ctx, duration_s=2.0, canary_every=16)
    assert report["serving"] == "learner" and report["status"] == "complete"
    assert report["prompts"] >= 16 and report["prompts"] % 16 == 0
    saved = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert saved["prompts"] == report["prompts"]
    samples = saved["samples"]
    assert sum(s["canary_checks"] for s in samples) == report["prompts"] // 16
    assert sum(s["rollbacks"] for s in samples) == 0  # the micro thresholds never trip
    assert (tmp_path / "soak" / "soak.png").is_file()
    assert report["learning"] is True and report["serving"] == "learner"


def test_soak_counts_forced_canary_rollbacks(micro_b: MicroB, tmp_path, monkeypatch):
    ctx = micro_b.ctx("evaluate", tmp_path / "soak")
    p = mission_b._params(ctx)
    strict = p.model_copy(update={"canary": p.canary.model_copy(update={"rollback_below": 1.01})})
    monkeypatch.setattr(mission_b, "_params", lambda _ctx: strict)
    report = mission_b.soak(ctx, duration_s=1.0, canary_every=8)
    samples = report["samples"]
    checks = sum(s["canary_checks"] for s in samples)
    assert checks == report["prompts"] // 8 >= 1
    assert sum(s["canary_failures"] for s in samples) == checks
    assert sum(s["rollbacks"] for s in samples) == checks
    log = tmp_path / "soak" / "last_good" / "rollbacks.jsonl"
    assert len(log.read_text().splitlines()) == checks


def test_soak_refuses_a_canary_cadence_off_the_update_grid(micro_b: MicroB, tmp_path):
    with pytest.raises(ValueError, match="canary_every=12 must be a multiple"):
        mission_b.soak(micro_b.ctx("evaluate", tmp_path), duration_s=1.0, canary_every=12)
