"""Mission A (Agentic Planner) on a micro config: every phase, resume, parity, BC, PPO, KV hits.

One module-scoped run chains all phases for seed 0 with explicit inputs (as `bem-fleet train`
does); the tests inspect its artifacts or rerun single phases against them.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bem_tasks.config.loader import ConfigError, load_fleet
from bem_tasks.core import count_bem_parameters, save_model
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data import DataFileError
from bem_tasks.eval import read_records
from bem_tasks.fleet.runs import write_manifest
from bem_tasks.missions import mission_a
from bem_tasks.missions.planner import (
    MacroRouter,
    RoutedDecoder,
    TextCodec,
    encode_items,
    expected_reward,
    greedy_chooser,
    kl_divergence,
    load_codec,
    masked_logits,
    ppo_update,
)
from tests.missions.conftest import (
    PHASES,
    MicroRun,
    kl_overrun,
    load_router_system,
    run_interrupted,
    write_micro_project,
)


# ---------------------------------------------------------------------------- artifacts
def test_every_phase_writes_its_artifacts(micro: MicroRun) -> None:
    d = micro.dirs
    assert {f"{s}.jsonl" for s in ("train", "dev", "test")} <= {
        f.name for f in d["prepare"].iterdir()
    }
    assert micro.metrics["prepare"]["n_train"] == 96
    assert (d["pretrain_base"] / "model" / "model.safetensors").is_file()
    assert (d["pretrain_base"] / "model" / "bem_tokenizer.json").is_file()
    assert {"experts.safetensors", "baseline.safetensors", "systems.json"} <= {
        f.name for f in d["train_experts"].iterdir()
    }
    for phase in ("behavioral_cloning", "policy_gradient"):
        assert (d[phase] / "router.safetensors").is_file()
    for png in (
        d["pretrain_base"] / "loss.png",
        d["train_experts"] / "loss.png",
        d["behavioral_cloning"] / "loss.png",
        d["policy_gradient"] / "updates.png",
        d["evaluate"] / "evaluation.png",
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for phase in PHASES:
        assert json.loads((d[phase] / "manifest.json").read_text())["status"] == "complete"
    # every training loop checkpointed inside its phase folder
    for phase, loop in (
        ("pretrain_base", "base"),
        ("train_experts", "experts"),
        ("train_experts", "baseline"),
        ("behavioral_cloning", "router"),
        ("policy_gradient", "router"),
    ):
        assert list((d[phase] / "ckpt" / loop).glob("step-*/model.safetensors")), (phase, loop)


def test_pg_logs_reward_kl_and_entropy_per_update(micro: MicroRun) -> None:
    rows = [json.loads(line) for line in (micro.dirs["policy_gradient"] / "updates.jsonl").open()]
    assert [r["update"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"reward", "kl", "entropy", "em", "rejected", "lr"} <= set(r)
        assert 0.0 <= r["kl"] <= 0.05
    assert micro.metrics["policy_gradient"]["updates"] == 3


def test_evaluate_records_and_metrics(micro: MicroRun) -> None:
    records = read_records(micro.dirs["evaluate"] / "records.jsonl")
    test_ids = {it.id for it in mission_a._read_split(micro.ctx("evaluate", micro.tmp), "test")}
    scored = [r for r in records if "em" in r.metrics]
    assert len(scored) == (8 + 8) * 2  # (test + dev) x (router, baseline), one seed
    assert {r.system for r in records} == {"router", "baseline"}
    assert {r.slices for r in records} == {("slice_b",), ("slice_a",)}
    for r in scored:
        assert r.seed == 0
        assert r.metrics["em"] in (0.0, 100.0) and 0.0 <= r.metrics["f1"] <= 100.0
        assert r.metrics["generated_tokens"] >= 1
    router = [r for r in scored if r.system == "router"]
    for r in router:  # routing metrics belong to the router; the fused baseline has none
        assert r.metrics["plan_length"] <= 3  # locked by the horizon
        assert r.metrics["plan_length_unconstrained"] >= r.metrics["plan_length"]
    assert not any("plan_length" in r.metrics for r in records if r.system == "baseline")
    # latency only on the timed subset (micro: latency_examples = 8, every test item)
    timed = [r for r in records if "latency_ms" in r.metrics]
    assert {r.example_id for r in timed} == test_ids and len(timed) == 16
    for r in timed:  # per decoding step: the prompt prefill (time to first token) left out
        mm = r.metrics
        assert 0.0 < mm["ttft_ms"] < mm["latency_ms"]
        per_token = (mm["latency_ms"] - mm["ttft_ms"]) / (mm["generated_tokens"] - 1)
        assert mm["latency_per_token_ms"] == pytest.approx(per_token)
    # KV reuse on the serving workload (the test items plus generated questions over their
    # facts): one record per context group and system
    served = [r for r in records if "kv_hit_ratio" in r.metrics]
    assert {r.example_id.removeprefix("kv:") for r in served} <= test_ids
    for r in served:
        # the first request misses, the others reuse the shared prefix, never the question
        assert 0.0 < r.metrics["kv_hit_ratio"] < 1.0
        assert r.slices == ("slice_b",)
    by = {(r.example_id, r.system): r.metrics for r in served}
    for (eid, system), mm in by.items():
        if system == "router":  # both systems are causal: the whole shared prefix is reused
            assert mm["kv_hit_ratio"] == by[(eid, "baseline")]["kv_hit_ratio"]
            assert mm["base_kv_share"] == 1.0  # prompt tokens get zero gates
        else:
            assert mm["base_kv_share"] == 0.5  # only layer 0's K/V escape the fused adapter

    m = micro.metrics["evaluate"]
    keys = {"em", "f1", "latency_per_token_p50_ms", "latency_p50_ms", "kv_hit_ratio"}
    for system in ("router", "baseline"):
        assert keys <= set(m[system])
        lat = [m[system][f"latency_per_token_{q}_ms"] for q in ("p50", "p95", "p99")]
        assert lat == sorted(lat)
        for k in keys:
            assert m[f"{system}_{k}"] == m[system][k]
    assert {"plan_length", "plan_length_unconstrained_max", "flip_rate_unconstrained"} <= set(
        m["router"]
    )
    assert m["em_gain"] == pytest.approx(m["router"]["em"] - m["baseline"]["em"])
    assert m["param_parity"] == micro.metrics["train_experts"]["param_parity"]
    assert m["n_latency"] == 8 and m["n_kv_contexts"] == len(served) // 2
    assert m["n_kv_contexts"] < m["n_kv_requests"] <= 4 * m["n_kv_contexts"]
    for system in ("router", "baseline"):  # decoded from the served cache = from a full prefill
        assert m[f"{system}_kv_reuse_agreement"] == 1.0
        # every request but the first of its group reused the prefix
        assert m[f"{system}_kv_reused_requests"] == m["n_kv_requests"] - m["n_kv_contexts"]
    # test-slice means are the means of the slice_b records
    test_em = [r.metrics["em"] for r in router if r.slices == ("slice_b",)]
    assert m["router"]["em"] == pytest.approx(sum(test_em) / len(test_em))


def test_evaluated_answers_come_from_real_decoding(micro: MicroRun) -> None:
    """Re-decode one test example greedily and check the recorded output and score."""
    ctx, p, model, codec = load_router_system(micro)
    router = mission_a._load_router(model, p, micro.dirs["policy_gradient"] / "router.safetensors")
    test = encode_items(mission_a._read_split(ctx, "test"), codec)
    dec = RoutedDecoder(
        model, eos_id=codec.eos_id, max_new_tokens=32, device="cpu", router=router, chunk=2
    )
    out = dec(test[0].prompt, greedy_chooser(p.bem.tau, p.router.plan_horizon))
    rows = [json.loads(line) for line in (micro.dirs["evaluate"] / "outputs.jsonl").open()]
    row = next(r for r in rows if r["id"] == test[0].id and r["system"] == "router")
    assert row["output"] == codec.decode(out.tokens)
    assert row["decisions"] == out.decisions


# ---------------------------------------------------------------------------- parity
def test_param_parity_within_five_percent(micro: MicroRun) -> None:
    info = json.loads((micro.dirs["train_experts"] / "systems.json").read_text())
    ctx, p, experts, _ = load_router_system(micro)
    router = MacroRouter(32, horizon=3, hidden=16)
    assert info["router_params"] == sum(q.numel() for q in router.parameters())
    assert info["experts_params"] == count_bem_parameters(experts)
    assert info["router_system_params"] == info["experts_params"] + info["router_params"]
    baseline, _ = mission_a._load_base(ctx, p)
    mission_a._attach_fused(baseline, p, info["baseline_rank"], 0, alpha=info["baseline_alpha"])
    assert count_bem_parameters(baseline) == info["baseline_params"]
    assert abs(info["param_parity"] - 1.0) <= 0.05
    assert info["param_parity"] == pytest.approx(
        info["router_system_params"] / info["baseline_params"]
    )


def test_parity_out_of_reach_is_an_error(micro: MicroRun) -> None:
    def edit(params: dict) -> None:
        params["bem"]["rank"] = 1
        params["router"]["hidden"] = 1

    cfg = load_fleet(write_micro_project(micro.tmp / "p_parity", edit), "smoke")
    ctx = micro.ctx("train_experts", micro.tmp / "parity_out", cfg=cfg)
    with pytest.raises(ValueError, match="parameter parity .* outside 1 \\+/- 0.05"):
        mission_a.train_experts(ctx)


# ---------------------------------------------------------------------------- BC
def test_bc_clones_the_oracle_plans(micro: MicroRun) -> None:
    m = micro.metrics["behavioral_cloning"]
    assert m["bc_dev_token_accuracy"] >= 0.9
    # chunk-sticky decisions cannot beat the oracle's own chunk majority
    assert m["bc_dev_token_accuracy"] <= m["bc_dev_chunk_ceiling"] + 1e-9
    assert m["bc_dev_plan_length"] <= 3


# ---------------------------------------------------------------------------- PPO
@pytest.fixture(scope="module")
def fixed_batch(micro: MicroRun):
    """Trajectories of a fresh (high-entropy) policy on 6 train examples, fixed seed.

    The micro experts rarely decode a parsable answer, so the task reward can be equal on
    every trajectory; these optimiser tests score each trajectory instead by a reward known to
    be learnable from its decisions: agreement with the oracle plan's chunk labels."""
    from dataclasses import replace

    from bem_tasks.missions.planner import chunk_labels

    ctx, p, model, codec = load_router_system(micro)
    policy = mission_a._new_router(model, p, seed=123)
    train = encode_items(mission_a._read_split(ctx, "train"), codec)[:6]
    decoder = RoutedDecoder(
        model, eos_id=codec.eos_id, max_new_tokens=32, device="cpu", router=policy, chunk=2
    )
    batch, _ = mission_a.collect_rollouts(
        decoder, train, codec, p, torch.Generator().manual_seed(7)
    )
    decisions = [batch.actions[batch.traj == i].tolist() for i in range(len(train))]
    agreement = []
    for d, e in zip(decisions, train, strict=True):
        oracle = chunk_labels(e.skills, 2)[: len(d)]  # decoding may stop before the target ends
        agreement.append(sum(a == b for a, b in zip(d, oracle, strict=False)) / max(len(d), 1))
    batch = replace(batch, rewards=torch.tensor(agreement))
    assert batch.rewards.std() > 0  # the update has something to learn from
    return p, policy, batch


def test_ppo_update_increases_expected_reward_on_a_fixed_batch(fixed_batch) -> None:
    p, policy, batch = fixed_batch
    policy = copy.deepcopy(policy)
    reference = copy.deepcopy(policy)
    tau = p.bem.tau
    before = expected_reward(policy, batch, tau)
    assert before == pytest.approx(float(batch.rewards.mean()), abs=1e-6)  # on-policy: plain mean
    opt = torch.optim.Adam(policy.parameters(), lr=0.01)
    stats = ppo_update(policy, reference, opt, batch, tau=tau, clip=0.2, epochs=3, kl_bound=1.0)
    after = expected_reward(policy, batch, tau)
    assert stats.epochs == 3 and not stats.rejected
    assert after > before + 1e-4


def test_kl_trust_region_is_honoured(fixed_batch) -> None:
    p, policy, batch = fixed_batch
    tau, bound = p.bem.tau, 0.01
    reference = copy.deepcopy(policy)

    def kl_to_reference(router: MacroRouter) -> float:
        with torch.no_grad():
            ref = masked_logits(reference, batch, tau)
            return float(kl_divergence(ref, masked_logits(router, batch, tau)).mean())

    moderate = copy.deepcopy(policy)
    opt = torch.optim.Adam(moderate.parameters(), lr=0.003)
    for _ in range(5):
        stats = ppo_update(
            moderate, reference, opt, batch, tau=tau, clip=0.2, epochs=4, kl_bound=bound
        )
    assert 0.0 < kl_to_reference(moderate) <= bound
    assert stats.kl == pytest.approx(kl_to_reference(moderate))

    wild = copy.deepcopy(policy)
    opt = torch.optim.Adam(wild.parameters(), lr=50.0)
    stats = ppo_update(wild, reference, opt, batch, tau=tau, clip=0.2, epochs=4, kl_bound=bound)
    assert stats.rejected and stats.epochs == 0
    assert kl_to_reference(wild) <= bound
    for a, b in zip(wild.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b)  # the update was undone: the policy it started from is kept


def test_pg_phase_rejects_a_kl_overrun_shrinks_the_step_and_goes_on(micro: MicroRun) -> None:
    cfg = load_fleet(write_micro_project(micro.tmp / "p_kl", kl_overrun), "smoke")
    out = micro.tmp / "pg_overrun"
    m = mission_a.policy_gradient(micro.ctx("policy_gradient", out, cfg=cfg))
    rows = [json.loads(line) for line in (out / "updates.jsonl").open()]
    # every update ran; each overran at lr 50 -> 25 -> 15 (the floor, 0.3 x 50) and was rejected
    assert m["updates"] == 3 and [r["update"] for r in rows] == [1, 2, 3]
    assert [r["rejected"] for r in rows] == [True, True, True]
    assert [r["epochs"] for r in rows] == [0, 0, 0]
    assert [r["lr"] for r in rows] == [50.0, 25.0, 15.0]
    assert m["rejected_updates"] == 3 and m["final_lr"] == 15.0
    assert m["max_kl"] <= 1e-4
    bc = micro.dirs["behavioral_cloning"] / "router.safetensors"
    from safetensors.torch import load_file

    assert all(
        torch.equal(load_file(out / "router.safetensors")[k], v) for k, v in load_file(bc).items()
    )
    # nothing was accepted: the PPO router is the BC router, on dev too
    assert m["dev_reward_gain"] == 0.0 and m["dev_reward_ppo"] == m["dev_reward_bc"]
    assert m["dev_plans_changed"] == 0.0 and m["dev_reward_verdict"] == "no detectable change"


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("phase", "loop", "crash_at", "resumed_at", "weights"),
    [
        ("pretrain_base", "base", 15, 10, ["model/model.safetensors"]),
        ("train_experts", "baseline", 7, 4, ["experts.safetensors", "baseline.safetensors"]),
        ("behavioral_cloning", "router", 120, 100, ["router.safetensors"]),
        ("policy_gradient", "ppo", 2, 2, ["router.safetensors"]),
    ],
)
def test_interrupted_phase_resumes_to_identical_weights(
    micro: MicroRun, phase: str, loop: str, crash_at: int, resumed_at: int, weights: list[str]
) -> None:
    out = micro.tmp / f"resume_{phase}"
    run_interrupted(micro.ctx(phase, out), loop, crash_at)
    m = json.loads((out / "metrics.json").read_text())
    key = {"train_experts": "resumed_from_baseline"}.get(phase, "resumed_from")
    assert m[key] == resumed_at
    if phase == "train_experts":
        assert m["resumed_from_experts"] == 10  # the experts loop had finished: not redone
    from safetensors.torch import load_file

    for name in weights:
        got, want = load_file(out / name), load_file(micro.dirs[phase] / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


# ---------------------------------------------------------------------------- inputs / config
def test_a_broken_data_row_is_reported_with_file_and_line(micro: MicroRun) -> None:
    bad = micro.tmp / "bad_prepare"
    shutil.copytree(micro.dirs["prepare"], bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = str(int(row["answer"]) + 1)
    lines[2] = json.dumps(row)
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    # as if prepare itself had written the bad row: inputs are checked against their manifest
    write_manifest(bad, config_hash="micro", seed=None)
    ctx = micro.ctx("pretrain_base", micro.tmp / "bad_base")
    ctx.inputs["prepare"] = bad
    with pytest.raises(DataFileError, match=r"train\.jsonl:3: answer"):
        mission_a.pretrain_base(ctx)


def test_params_model_is_light_and_strict(micro: MicroRun) -> None:
    code = (
        "import sys, bem_tasks.missions.mission_a_params as m; "
        "print('torch' in sys.modules, m.MissionAParams.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "MissionAParams"]

    def edit(params: dict) -> None:
        params["router"]["horizon"] = 3  # the key is plan_horizon
        params["training"]["behavioral_cloning"]["lr"] = -1.0

    with pytest.raises(ConfigError) as err:
        load_fleet(write_micro_project(micro.tmp / "p_bad", edit), "smoke")
    text = str(err.value)
    assert "profiles.smoke.params.router.horizon: unknown key" in text
    assert "params.training.behavioral_cloning.lr" in text and "greater than 0" in text


def test_full_profile_records_a_local_model_without_copying(micro: MicroRun) -> None:
    from bem_tasks.core import build_model

    local = micro.tmp / "local_llama"
    save_model(build_model("llama", d_model=32, n_layers=1, n_heads=2), local, ByteTokenizer())

    def edit(params: dict) -> None:
        params["model"] = {"family": "llama", "path": str(local)}

    cfg = load_fleet(write_micro_project(micro.tmp / "p_full", edit), "smoke")
    out = micro.tmp / "full_base"
    m = mission_a.pretrain_base(micro.ctx("pretrain_base", out, cfg=cfg))
    assert m["local_model"] is True and m["model_type"] == "llama"
    assert json.loads((out / "base.json").read_text())["path"] == str(local.resolve())
    assert not list(out.rglob("*.safetensors"))
    ctx = micro.ctx("train_experts", micro.tmp / "unused", cfg=cfg)
    ctx.inputs["pretrain_base"] = out
    assert mission_a._base_dir(ctx) == local.resolve()

    def wrong(params: dict) -> None:
        params["model"] = {"family": "gpt2", "path": str(local)}

    cfg = load_fleet(write_micro_project(micro.tmp / "p_full2", wrong), "smoke")
    with pytest.raises(ValueError, match="model_type='llama'"):
        mission_a.pretrain_base(micro.ctx("pretrain_base", micro.tmp / "full_base2", cfg=cfg))


def test_hf_tokenizer_codec_matches_the_byte_codec(tmp_path: Path) -> None:
    ByteTokenizer().to_hf().save_pretrained(tmp_path)
    hf, byte = load_codec(tmp_path), TextCodec(ByteTokenizer())
    assert not hf.is_bytes
    text = 'R:1,2;C:3;F:{"answer":3}'
    assert hf.spans(text) == byte.spans(text)
    assert hf.eos_id == byte.eos_id
    assert hf.decode(hf.encode(text)) == text


# ---------------------------------------------------------------------------- policy rules
def test_hysteresis_and_horizon_rules() -> None:
    from bem_tasks.missions.planner import chunk_labels, greedy_decision, policy_logits, segments

    logits = torch.tensor([0.0, 0.3, 0.1])
    assert greedy_decision(logits, -1, 0, tau=0.5, horizon=3) == 1  # first chunk: argmax
    assert greedy_decision(logits, 0, 1, tau=0.5, horizon=3) == 0  # 0.3 does not beat 0 + 0.5
    assert greedy_decision(logits, 0, 1, tau=0.2, horizon=3) == 1  # 0.3 beats 0 + 0.2
    assert greedy_decision(logits, 0, 3, tau=0.0, horizon=3) == 0  # horizon used up: locked
    pl = policy_logits(logits[None], torch.tensor([0]), torch.tensor([1]), 0.5, 3)[0]
    assert pl.tolist() == pytest.approx([0.5, 0.3, 0.1])  # +tau on the current expert
    locked = policy_logits(logits[None], torch.tensor([2]), torch.tensor([3]), 0.0, 3)[0]
    assert locked.softmax(-1).tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert chunk_labels([0, 0, 0, 1, 1, 2, 2], 2) == [0, 0, 1, 2]  # [0,1] tie -> earlier skill
    assert segments([0, 0, 1, 1, 2]) == 3 and segments([]) == 0


def test_cli_runs_the_manuals_mission_a_flow(micro: MicroRun, capsys) -> None:
    """`bem-fleet train mission_a --phase behavioral_cloning --output AR0`, then
    `... --phase policy_gradient --checkpoint AR0 --output AR1`, then
    `bem-fleet evaluate --mission mission_a --model AR1 --output DIR` (earlier phases --inputs-from)."""
    from bem_tasks.cli import main

    arch = str(micro.tmp / "project" / "configs" / "bem_fleet_architecture.yml")
    run_dir, ar0 = micro.tmp / "run", micro.tmp / "cli_ar0"
    ar1, results = micro.tmp / "cli_ar1", micro.tmp / "cli_eval"
    shared_args = ["--inputs-from", str(run_dir), "--config", arch, "--profile", "smoke"]
    assert main(["train", "mission_a", "--phase", "behavioral_cloning",
                 "--output", str(ar0), *shared_args]) == 0  # fmt: skip
    assert json.loads((ar0 / "metrics.json").read_text()) == micro.metrics["behavioral_cloning"]
    assert main(["train", "mission_a", "--phase", "policy_gradient", "--checkpoint",
                 str(ar0), "--output", str(ar1), *shared_args]) == 0  # fmt: skip
    assert main(["evaluate", "--mission", "mission_a", "--model", str(ar1),
                 "--output", str(results), *shared_args]) == 0  # fmt: skip
    metrics = json.loads((results / "metrics.json").read_text())
    assert {"router", "baseline", "param_parity"} <= set(metrics)
    records = read_records(results / "records.jsonl")
    assert {r.system for r in records} == {"router", "baseline"}
    assert (results / "manifest.json").exists()
