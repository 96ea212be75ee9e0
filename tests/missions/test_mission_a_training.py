"""Mission A training: the same tuning budget for the experts and the fused baseline (parity of
tuning), PPO that rejects a KL overrun and goes on with a smaller step, and the dev reward of
the BC and PPO routers with a paired bootstrap CI."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bem_tasks.config.loader import ConfigError, load_fleet
from bem_tasks.core import bem_layers, load_weights
from bem_tasks.missions import mission_a
from bem_tasks.missions.planner import (
    MacroRouter,
    RolloutBatch,
    RoutedDecoder,
    encode_items,
    ppo_update,
)
from tests.missions.conftest import (
    MICRO,
    MicroRun,
    kl_overrun,
    run_interrupted,
    write_micro_project,
)

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


def test_an_interrupted_tuning_does_not_redo_finished_points(micro: MicroRun) -> None:
    out = micro.tmp / "resume_tuning"
    run_interrupted(micro.ctx("train_experts", out), "tune_baseline_1", 2)
    m = json.loads((out / "metrics.json").read_text())
    # the experts' 4 points and the baseline's first were finished; tune_baseline_1 had no
    # checkpoint yet (one per point, at its end) and ran again
    assert m["tuning_points_resumed"] == 5
    assert _systems(out) == _systems(micro.dirs["train_experts"])
    for name in ("experts.safetensors", "baseline.safetensors"):
        got, want = load_file(out / name), load_file(micro.dirs["train_experts"] / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_one_base_model_serves_every_grid_point(
    micro: MicroRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_experts loads the base once and never copies it (a 7B base in bf16 would not fit
    several times on one GPU); the adapters come and go on it."""
    loads: list[torch.nn.Module] = []
    real_load = mission_a._load_base

    def counting_load(ctx, p):
        model, codec = real_load(ctx, p)
        loads.append(model)
        return model, codec

    real_copy = copy.deepcopy

    def no_model_copy(x, *args, **kwargs):
        assert not isinstance(x, torch.nn.Module), "train_experts deep-copied a model"
        return real_copy(x, *args, **kwargs)

    monkeypatch.setattr(mission_a, "_load_base", counting_load)
    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    out = micro.tmp / "one_base"
    shutil.copytree(micro.dirs["train_experts"] / "ckpt", out / "ckpt")  # resume: fast
    mission_a.train_experts(micro.ctx("train_experts", out))
    assert len(loads) == 1 and not bem_layers(loads[0])  # adapters detached at the end
    for name in ("experts.safetensors", "baseline.safetensors"):
        got, want = load_file(out / name), load_file(micro.dirs["train_experts"] / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_a_choice_on_the_grid_edge_is_flagged(micro: MicroRun) -> None:
    info = _systems(micro.dirs["train_experts"])
    for system in SYSTEMS:
        for k in ("lr", "alpha"):
            values = info["tuning"]["grid"][k]
            edge = info[f"{system}_{k}"] in (min(values), max(values))
            assert info[f"{system}_{k}_at_grid_edge"] == edge
    grid = {"lr": [0.003, 0.01, 0.03], "alpha": [4.0, 8.0]}
    assert mission_a._at_grid_edge({"lr": 0.01, "alpha": 8.0}, grid) == {
        "lr_at_grid_edge": False,
        "alpha_at_grid_edge": True,
    }


def test_tuning_params_are_checked(micro: MicroRun) -> None:
    from pydantic import ValidationError

    from bem_tasks.missions.mission_a_params import TuningSpec

    with pytest.raises(ValidationError, match="lr"):
        TuningSpec.model_validate({"grid": {"lr": [], "alpha": [8.0]}, "steps": 3})
    with pytest.raises(ValidationError, match="alpha"):
        TuningSpec.model_validate({"grid": {"lr": [0.01], "alpha": [-1.0]}, "steps": 3})

    def check(name: str, edit, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            load_fleet(write_micro_project(micro.tmp / name, edit), "smoke")

    # tuning chooses lr and alpha: a setting that would be ignored is an error, not silence
    check(
        "p_te_lr",
        lambda d: d["training"]["train_experts"].update(lr=0.003),
        r"params.training.train_experts: .*lr is not used.*tuning.grid.lr",
    )
    check(
        "p_alpha",
        lambda d: d["bem"].update(alpha=8.0),
        r"bem.alpha is not used by Mission A.*tuning.grid.alpha",
    )
    check(
        "p_tune_long",
        lambda d: d["tuning"].update(steps=11),
        r"tuning.steps=11 exceeds training.train_experts.steps=10",
    )


# ---------------------------------------------------------------------------- PPO
def _updates(out) -> list[dict]:
    return [json.loads(line) for line in (out / "updates.jsonl").open()]


def test_an_update_with_an_overrun_is_undone_whole() -> None:
    """The overrun comes at a later epoch: the epochs before it are undone too, and the
    optimizer state is the one the update started from."""
    torch.manual_seed(0)
    router = MacroRouter(8, hidden=16)
    n = 24
    feats = router.features(torch.randn(n, 8), torch.randn(n, 8), [-1] * n, [0] * n)
    with torch.no_grad():
        logp = torch.log_softmax(router(feats), -1)
    actions = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(1))[:, 0]
    batch = RolloutBatch(
        feats=feats,
        prev=torch.full((n,), -1),
        segs=torch.zeros(n, dtype=torch.long),
        actions=actions,
        logp_old=logp.gather(1, actions[:, None])[:, 0],
        traj=torch.arange(n) // 4,
        rewards=torch.linspace(0.0, 1.0, n // 4),
    )
    reference = copy.deepcopy(router)
    kw = {"tau": 0.0, "clip": 0.2, "entropy_coef": 0.0}

    def kl_after(epochs: int) -> float:
        r = copy.deepcopy(router)
        opt = torch.optim.Adam(r.parameters(), lr=0.05)
        return ppo_update(r, reference, opt, batch, epochs=epochs, kl_bound=1e9, **kw).kl

    first, last = kl_after(1), kl_after(4)
    assert 0 < first < last
    policy = copy.deepcopy(router)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    start = copy.deepcopy(policy.state_dict())
    opt_start = copy.deepcopy(opt.state_dict())
    bound = (first + last) / 2  # epoch 1 fits, epoch 4 does not
    stats = ppo_update(policy, reference, opt, batch, epochs=4, kl_bound=bound, **kw)
    assert stats.rejected and stats.epochs == 0
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in start.items())
    assert opt.state_dict() == opt_start  # no Adam moments from the undone epochs


def test_a_rejected_update_is_followed_by_accepted_ones(micro: MicroRun) -> None:
    """lr 1 overruns KL 0.01 at update 1; the shrunk step (x 0.001) is accepted: all epochs,
    KL inside the bound, and the router moves away from BC."""

    def edit(params: dict) -> None:
        params["training"]["policy_gradient"]["lr"] = 1.0
        params["policy_gradient"] = {
            "kl_bound": 0.01,
            "kl_coef": 0.0,
            "entropy_coef": 1.0,
            "lr_shrink": 0.001,
            "min_lr_fraction": 0.001,
        }

    cfg = load_fleet(write_micro_project(micro.tmp / "p_recover", edit), "smoke")
    out = micro.tmp / "pg_recover"
    m = mission_a.policy_gradient(micro.ctx("policy_gradient", out, cfg=cfg))
    rows = _updates(out)
    assert [(r["lr"], r["rejected"], r["epochs"]) for r in rows[:2]] == [
        (1.0, True, 0),
        (0.001, False, 4),
    ]
    assert 0.0 < rows[1]["kl"] <= 0.01
    assert m["rejected_updates"] == sum(r["rejected"] for r in rows) >= 1
    bc = load_file(micro.dirs["behavioral_cloning"] / "router.safetensors")
    ppo = load_file(out / "router.safetensors")
    assert not all(torch.equal(ppo[k], v) for k, v in bc.items())


def test_a_resumed_pg_run_equals_an_unbroken_one(micro: MicroRun) -> None:
    """A crash after update 1 (a rejected one: the shrunk lr must survive the restart) and a
    resume give the router and the update log of a run that never stopped."""
    cfg = load_fleet(write_micro_project(micro.tmp / "p_kl_resume", kl_overrun), "smoke")
    unbroken, resumed = micro.tmp / "pg_unbroken", micro.tmp / "pg_resumed"
    mission_a.policy_gradient(micro.ctx("policy_gradient", unbroken, cfg=cfg))
    run_interrupted(micro.ctx("policy_gradient", resumed, cfg=cfg), "ppo", 1)
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"] == 1
    assert _updates(resumed) == _updates(unbroken)
    got = load_file(resumed / "router.safetensors")
    want = load_file(unbroken / "router.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_why_ppo_did_what_it_did_is_reported(micro: MicroRun) -> None:
    rows = _updates(micro.dirs["policy_gradient"])
    m = micro.metrics["policy_gradient"]
    for r in rows:  # equal rewards <=> all-zero advantages (no gradient from the batch)
        assert (r["reward_std"] == 0.0) == r["zero_advantage"]
    flat = sum(r["zero_advantage"] for r in rows)
    assert m["zero_advantage_updates"] == flat
    assert m["dev_reward_reason"].startswith(
        f"all rollouts of {flat}/{len(rows)} updates had equal rewards; "
        f"entropy {m['mean_entropy']:.3g}; max KL {m['max_kl']:.3g} of {m['kl_bound']:g}; "
        f"{m['rejected_updates']} rejected"
    )


def test_flat_rewards_give_zero_advantages() -> None:
    batch = RolloutBatch.from_rollouts([], [])
    batch.rewards = torch.full((4,), 0.37)
    assert not batch.advantages().any()
    batch.rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert batch.advantages().tolist() == pytest.approx([-0.866, 0.866, 0.866, -0.866], abs=1e-3)


def test_the_dev_reward_interval_uses_the_fleets_statistics_settings(
    micro: MicroRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One significance level: the architecture's statistics.confidence and n_resamples."""
    stats = micro.cfg.arch.statistics.model_copy(update={"confidence": 0.8, "n_resamples": 999})
    cfg = dataclasses.replace(
        micro.cfg, arch=micro.cfg.arch.model_copy(update={"statistics": stats})
    )
    calls: list[dict] = []
    real = mission_a.paired_bootstrap

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mission_a, "paired_bootstrap", spy)
    out = micro.tmp / "pg_statistics"
    shutil.copytree(micro.dirs["policy_gradient"] / "ckpt", out / "ckpt")  # resume at the end
    m = mission_a.policy_gradient(micro.ctx("policy_gradient", out, cfg=cfg))
    assert [(c["confidence"], c["n_resamples"]) for c in calls] == [(0.8, 999)]
    assert m["dev_reward_confidence"] == 0.8
    assert m["dev_reward_gain"] == micro.metrics["policy_gradient"]["dev_reward_gain"]


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
