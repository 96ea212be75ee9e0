"""Mission A training: the same tuning budget for the experts and the fused baseline (parity of
tuning), PPO that rejects a KL overrun and goes on with a smaller step, and the dev reward of
the BC and PPO routers with a paired bootstrap CI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bem_tasks.config.loader import load_fleet
from bem_tasks.core import bem_layers, load_weights
from bem_tasks.fleet.phases import execute
from bem_tasks.missions import common, mission_a
from bem_tasks.missions.planner import RoutedDecoder, encode_items
from tests.missions.conftest import MICRO, MicroRun, write_micro_project

SYSTEMS = ("experts", "baseline")


def _systems(run_dir) -> dict:
    return json.loads((run_dir / "systems.json").read_text())


# ---------------------------------------------------------------------------- tuning parity
def test_both_systems_get_the_same_grid_and_steps(micro: MicroRun) -> None:
    info = _systems(micro.dirs["train_experts"])
    tuning = info["tuning"]
    assert tuning["grid"] == MICRO["tuning"]["grid"]
    assert tuning["steps"] == MICRO["tuning"]["steps"]
    want = [(lr, a) for lr in tuning["grid"]["lr"] for a in tuning["grid"]["alpha"]]
    for system in SYSTEMS:
        assert [(q["lr"], q["alpha"]) for q in tuning[system]] == want
        # every grid point trained exactly `steps` steps, for each system alike
        for i in range(len(want)):
            ckpts = list(
                (micro.dirs["train_experts"] / "ckpt" / f"tune_{system}_{i}").glob("step-*")
            )
            assert [c.name for c in ckpts] == [f"step-{tuning['steps']:08d}"]
    metrics = micro.metrics["train_experts"]
    assert metrics["tuning"] == tuning
    assert {k: metrics[k] for k in info if k != "tuning"} == {
        k: v for k, v in info.items() if k != "tuning"
    }


def test_the_chosen_values_are_the_best_dev_scores(micro: MicroRun) -> None:
    info = _systems(micro.dirs["train_experts"])
    for system in SYSTEMS:
        best = min(info["tuning"][system], key=lambda q: q["dev_loss"])
        assert (info[f"{system}_lr"], info[f"{system}_alpha"]) == (best["lr"], best["alpha"])


def test_a_tuning_score_is_the_dev_loss_of_that_points_model(micro: MicroRun) -> None:
    """Rebuild the baseline's last grid point from its checkpoint and score dev again."""
    info = _systems(micro.dirs["train_experts"])
    ctx = micro.ctx("train_experts", micro.tmp / "unused")
    p = mission_a._params(ctx)
    i = len(info["tuning"]["baseline"]) - 1
    point = info["tuning"]["baseline"][i]
    model, codec = mission_a._load_base(ctx, p)
    mission_a._attach_fused(model, p, info["baseline_rank"], 0, alpha=point["alpha"])
    ckpt = micro.dirs["train_experts"] / "ckpt" / f"tune_baseline_{i}"
    load_weights(next(ckpt.glob("step-*")) / "model.safetensors", model, trainable_only=True)
    model.eval()
    dev = encode_items(mission_a._read_split(ctx, "dev"), codec)
    b = mission_a.make_batch(dev, codec.pad_id, loss_on_prompt=False)
    with torch.no_grad():
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    assert point["dev_loss"] == pytest.approx(float(loss), rel=1e-5)


def test_later_phases_rebuild_the_systems_with_the_tuned_alpha(micro: MicroRun) -> None:
    info = _systems(micro.dirs["train_experts"])
    ctx = micro.ctx("behavioral_cloning", micro.tmp / "unused")
    p = mission_a._params(ctx)
    model, _ = mission_a._experts_system(ctx, p)
    assert {layer.alpha for _, layer in bem_layers(model)} == {info["experts_alpha"]}


def test_an_absurd_learning_rate_is_never_chosen(micro: MicroRun) -> None:
    def edit(params: dict) -> None:
        params["training"]["train_experts"].update(steps=4, checkpoint_every=4)
        params["tuning"] = {"grid": {"lr": [1.0e4, 0.01], "alpha": [8.0]}, "steps": 3}

    cfg = load_fleet(write_micro_project(micro.tmp / "p_absurd", edit), "smoke")
    m = mission_a.train_experts(micro.ctx("train_experts", micro.tmp / "absurd", cfg=cfg))
    for system in SYSTEMS:
        absurd, sane = m["tuning"][system]
        assert absurd["lr"] == 1.0e4 and sane["lr"] == 0.01
        assert absurd["dev_loss"] is None or absurd["dev_loss"] > sane["dev_loss"]
        assert m[f"{system}_lr"] == 0.01


def test_a_grid_where_every_point_diverges_is_an_error() -> None:
    points = [{"lr": 1.0, "alpha": 8.0, "dev_loss": None}]
    with pytest.raises(ValueError, match="params.tuning: every grid point diverged for the"):
        mission_a._best_point(points, "baseline")


def test_an_interrupted_tuning_does_not_redo_finished_points(
    micro: MicroRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = micro.tmp / "resume_tuning"
    real_progress = common.progress

    def crash(ctx, name, step, total, **values):
        real_progress(ctx, name, step, total, **values)
        if name == "tune_baseline_1" and step == 2:
            raise RuntimeError("simulated worker crash")

    monkeypatch.setattr(common, "progress", crash)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        execute(micro.ctx("train_experts", out), config_hash="micro")
    monkeypatch.setattr(common, "progress", real_progress)
    execute(micro.ctx("train_experts", out), config_hash="micro")
    m = json.loads((out / "metrics.json").read_text())
    # the experts' 4 points and the baseline's first were finished; tune_baseline_1 had no
    # checkpoint yet (one per point, at its end) and ran again
    assert m["tuning_points_resumed"] == 5
    assert _systems(out) == _systems(micro.dirs["train_experts"])
    for name in ("experts.safetensors", "baseline.safetensors"):
        got, want = load_file(out / name), load_file(micro.dirs["train_experts"] / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_tuning_params_are_checked() -> None:
    from pydantic import ValidationError

    from bem_tasks.missions.mission_a_params import TuningSpec

    with pytest.raises(ValidationError, match="lr"):
        TuningSpec.model_validate({"grid": {"lr": [], "alpha": [8.0]}, "steps": 3})
    with pytest.raises(ValidationError, match="alpha"):
        TuningSpec.model_validate({"grid": {"lr": [0.01], "alpha": [-1.0]}, "steps": 3})


# ---------------------------------------------------------------------------- PPO
def _overrun(params: dict) -> None:
    """Every PPO step leaves a tiny KL region: lr 50 with an entropy bonus (non-zero gradient
    even if every reward is equal)."""
    params["training"]["policy_gradient"]["lr"] = 50.0
    params["policy_gradient"] = {
        "kl_bound": 1e-4,
        "kl_coef": 0.0,
        "entropy_coef": 1.0,
        "lr_shrink": 0.5,
        "min_lr_fraction": 0.3,
    }


def test_a_resumed_pg_run_keeps_the_shrunk_step(
    micro: MicroRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_fleet(write_micro_project(micro.tmp / "p_kl_resume", _overrun), "smoke")
    out = micro.tmp / "pg_overrun_resume"
    real_progress = mission_a.progress

    def crash(ctx, name, step, total, **values):
        real_progress(ctx, name, step, total, **values)
        if name == "ppo" and step == 1:
            raise RuntimeError("simulated worker crash")

    monkeypatch.setattr(mission_a, "progress", crash)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        execute(micro.ctx("policy_gradient", out, cfg=cfg), config_hash="micro")
    monkeypatch.setattr(mission_a, "progress", real_progress)
    execute(micro.ctx("policy_gradient", out, cfg=cfg), config_hash="micro")
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] == 1
    rows = [json.loads(line) for line in (out / "updates.jsonl").open()]
    assert [r["lr"] for r in rows] == [50.0, 25.0, 15.0]  # as an unbroken run: the shrunk lr
    assert m["final_lr"] == 15.0


def test_dev_reward_bc_vs_ppo_has_a_consistent_ci(micro: MicroRun) -> None:
    m = micro.metrics["policy_gradient"]
    assert m["dev_reward_n"] == MICRO["data"]["n_dev"]
    assert m["dev_reward_gain"] == pytest.approx(m["dev_reward_ppo"] - m["dev_reward_bc"])
    assert m["dev_reward_gain_ci_low"] <= m["dev_reward_gain"] <= m["dev_reward_gain_ci_high"]
    low, high = m["dev_reward_gain_ci_low"], m["dev_reward_gain_ci_high"]
    verdict = "improved" if low > 0 else "worse" if high < 0 else "no detectable change"
    assert m["dev_reward_verdict"] == verdict
    for k in ("max_kl", "mean_entropy", "rejected_updates", "final_lr", "dev_plans_changed"):
        assert math.isfinite(m[k]), k


def test_dev_reward_is_the_training_reward_of_greedy_dev_decodes(micro: MicroRun) -> None:
    """Re-decode the dev split with the BC router and score it with rollout_reward."""
    ctx = micro.ctx("policy_gradient", micro.tmp / "unused")
    p = mission_a._params(ctx)
    model, codec = mission_a._experts_system(ctx, p)
    bc = mission_a._load_router(model, p, micro.dirs["behavioral_cloning"] / "router.safetensors")
    dev = encode_items(mission_a._read_split(ctx, "dev"), codec)
    decoder = RoutedDecoder(
        model,
        eos_id=codec.eos_id,
        max_new_tokens=p.evaluate.max_new_tokens,
        device="cpu",
        router=bc,
        chunk=p.bem.chunk_size,
    )
    choose = mission_a.greedy_chooser(p.bem.tau, p.router.plan_horizon)
    rewards = []
    for e in dev:
        dec = decoder(e.prompt, choose)
        rewards.append(mission_a.rollout_reward(dec, codec.decode(dec.tokens), e.answer, p)[0])
    got = micro.metrics["policy_gradient"]["dev_reward_bc"]
    assert got == pytest.approx(sum(rewards) / len(rewards))
