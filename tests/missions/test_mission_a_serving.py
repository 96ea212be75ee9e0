"""Mission A evaluation as served: batched decoding, KV reuse on a shared-prefix workload, the
unconstrained plan length, and the gates these feed (on the shared micro run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bem_tasks.gates import analysis_specs, evaluate_gates, load_gates
from bem_tasks.missions import mission_a
from bem_tasks.missions.planner import (
    MacroRouter,
    PrefixCache,
    RoutedDecoder,
    encode_items,
    greedy_chooser,
    greedy_decision,
    length_buckets,
    segments,
    shared_prefix,
    unconstrained_decisions,
)
from bem_tasks.stats import analyze
from tests.missions.conftest import ROOT, MicroRun, load_router_system

GATES = ROOT / "configs" / "gates_bem2.yaml"


def _systems(micro: MicroRun, router: MacroRouter | None = None, prompt_router=None):
    """(router-system decoder, fused-baseline decoder, params, codec) from the micro run."""
    ctx, p, model, codec = load_router_system(micro)
    if router is None:
        router = mission_a._load_router(
            model, p, micro.dirs["policy_gradient"] / "router.safetensors"
        )
    info = json.loads((micro.dirs["train_experts"] / "systems.json").read_text())
    fused, _ = mission_a._load_base(ctx, p)
    mission_a._attach_fused(fused, p, info["baseline_rank"], 0, alpha=info["baseline_alpha"])
    mission_a.load_weights(
        micro.dirs["train_experts"] / "baseline.safetensors", fused, trainable_only=True
    )
    fused.eval()
    kw = {"eos_id": codec.eos_id, "max_new_tokens": 32, "device": "cpu"}
    routed = RoutedDecoder(model, router=router, chunk=2, prompt_router=prompt_router, **kw)
    return routed, RoutedDecoder(fused, **kw), p, codec


# ---------------------------------------------------------------------------- batched decoding
def test_batched_decoding_gives_the_batch_one_tokens_and_decisions(micro: MicroRun) -> None:
    routed, fused, p, codec = _systems(micro)
    ctx = micro.ctx("evaluate", micro.tmp)
    examples = [
        e
        for split in ("test", "dev", "train")
        for e in encode_items(mission_a._read_split(ctx, split), codec)
    ][:40]
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    buckets = length_buckets([e.prompt for e in examples], 16)
    assert max(len(b) for b in buckets) > 1  # some rows really share a batch
    for decoder in (routed, fused):
        for idx in buckets:
            batched = decoder.batch([examples[i].prompt for i in idx], choose)
            for i, b in zip(idx, batched, strict=True):
                single = decoder(examples[i].prompt, choose)
                assert b.tokens == single.tokens
                assert b.decisions == single.decisions
                assert b.fed == single.fed
    # evaluate checked the same on its timed examples
    m = micro.metrics["evaluate"]
    assert m["router_batch_agreement"] == m["baseline_batch_agreement"] == 1.0


def test_length_buckets_need_no_padding(micro: MicroRun) -> None:
    prompts = [[1] * n for n in (3, 5, 3, 3, 5, 4)]
    buckets = length_buckets(prompts, 2)
    assert sorted(i for b in buckets for i in b) == list(range(6))
    assert all(len({len(prompts[i]) for i in b}) == 1 and len(b) <= 2 for b in buckets)
    _, fused, _, _ = _systems(micro)
    with pytest.raises(ValueError, match="prompts of one length"):
        fused.batch([[1, 2], [1, 2, 3]])


# ---------------------------------------------------------------------------- KV reuse
def _workload(micro: MicroRun, p, codec):
    ctx = micro.ctx("evaluate", micro.tmp)
    test = mission_a._read_split(ctx, "test")
    return mission_a._serving_workload(test, {it.id for it in test}, p, codec)


def test_serving_workload_shares_fact_contexts_with_valid_items(micro: MicroRun) -> None:
    _, _, p, codec = _systems(micro)
    groups = _workload(micro, p, codec)
    assert len(groups) >= 6
    ids = [e.id for g in groups for e in g]
    assert len(ids) == len(set(ids))  # no request duplicates another (or a test item)
    for g in groups:
        assert 2 <= len(g) <= p.evaluate.kv_questions
        context = codec.decode(g[0].prompt).split("|")[0] + "|"
        n = shared_prefix([e.prompt for e in g])
        assert n >= len(codec.encode(context))  # the whole fact context is shared
        assert n < min(len(e.prompt) for e in g)  # and the questions differ
    assert groups == _workload(micro, p, codec)  # deterministic


def test_prefix_reuse_decodes_exactly_what_a_fresh_prefill_decodes(micro: MicroRun) -> None:
    routed, fused, p, codec = _systems(micro)
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    for decoder in (routed, fused):
        caches = PrefixCache(decoder)
        for group in _workload(micro, p, codec)[:4]:
            n = shared_prefix([e.prompt for e in group])
            for e in group:
                reused, cache = caches.serve(e.prompt, n)
                assert reused == n  # causal systems: the whole shared prefix is served
                served = decoder(e.prompt, choose, prefix=cache)
                fresh = decoder(e.prompt, choose)
                assert (served.tokens, served.decisions) == (fresh.tokens, fresh.decisions)
        assert len(caches.store) == 4  # one prefill per distinct prefix


def _question_routed(ids: torch.Tensor) -> torch.Tensor:
    """Non-causal prompt routing: every prompt token goes to the expert the prompt's last
    question character picks (a later token decides how the prefix is computed)."""
    expert = ids[:, -2] % 3  # the character before the closing newline
    gates = torch.nn.functional.one_hot(expert, 3).float()
    return gates[:, None, :].expand(ids.shape[0], ids.shape[1], 3)


def _kv_ratios(decoder: RoutedDecoder, groups) -> list[float]:
    caches, out = PrefixCache(decoder), []
    for g in groups:
        n = shared_prefix([e.prompt for e in g])
        out += [caches.serve(e.prompt, n)[0] / len(e.prompt) for e in g]
    return out


def _kv_decision(router_values: list[float], baseline_values: list[float]):
    cfg = load_gates(GATES)
    specs = [s for s in analysis_specs(cfg, "mission_a") if s["metric"] == "kv_hit_ratio"]
    assert len(specs) == 1
    specs[0]["candidate"] = np.asarray(router_values)[:, None]
    specs[0]["baseline"] = np.asarray(baseline_values)[:, None]
    results = analyze(specs, n_resamples=1000)
    decision = evaluate_gates("mission_a", cfg, results)
    return decision, {o.gate: o for o in decision.gates}["kv_hit_ratio"]


def test_a_router_that_routes_the_prefix_from_the_question_loses_kv_hits(
    micro: MicroRun,
) -> None:
    causal, fused, p, codec = _systems(micro)
    leaky, _, _, _ = _systems(micro, router=causal.router, prompt_router=_question_routed)
    groups = _workload(micro, p, codec)
    base = _kv_ratios(fused, groups)
    honest = _kv_ratios(causal, groups)
    lossy = _kv_ratios(leaky, groups)
    assert len(base) >= 30  # enough paired requests for the gate's min_examples
    assert honest == base  # both causal: the same prefix served to every request
    assert np.mean(lossy) < np.mean(base)
    assert min(r / b for r, b in zip(lossy, base, strict=True)) == 0.0  # some requests: nothing
    # prefix K/V computed under the question's routing cannot be reused by another question
    # unless that question happens to route the prefix the same way
    decision, gate = _kv_decision(lossy, base)
    assert gate.status == "failed" and decision.decision == "REJECTED"
    # the causal router passes it: its ratios equal the baseline's, inside the 1% margin
    _, gate = _kv_decision(honest, base)
    assert gate.status == "passed"


# ---------------------------------------------------------------------------- plan length
def test_unconstrained_decisions_follow_the_decoded_plan_until_the_lock() -> None:
    tau, horizon = 0.1, 3
    # logits over 3 experts per decision point: wants 0, 1, 2, then 0 again, then stays
    seq = [torch.tensor(x) for x in ([2, 0, 0], [0, 2, 0], [0, 0, 2], [2, 0, 0], [2, 0, 0.05])]
    decoded, cur, segs = [], -1, 0
    for lg in seq:
        a = greedy_decision(lg, cur, segs, tau, horizon)
        segs += a != cur
        cur = a
        decoded.append(a)
    free = unconstrained_decisions(seq, tau)
    assert decoded == [0, 1, 2, 2, 2] and segments(decoded) == 3  # the lock held it at 3
    assert free == [0, 1, 2, 0, 0] and segments(free) == 4  # what the router wanted
    assert unconstrained_decisions(seq[:3], tau) == decoded[:3]


class _Restless(MacroRouter):
    """A macro-policy that wants a new expert at every decision: (segments used) mod 3."""

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        segs = feats[:, -(self.horizon + 1) :].argmax(-1)
        return 5.0 * torch.nn.functional.one_hot(segs % self.num_experts, self.num_experts)


def test_an_unconstrained_plan_beyond_the_horizon_fails_the_plan_gate(micro: MicroRun) -> None:
    routed, _, p, codec = _systems(micro, router=_Restless(32, horizon=3, hidden=4))
    ctx = micro.ctx("evaluate", micro.tmp)
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    rows = []
    for e in encode_items(mission_a._read_split(ctx, "test"), codec):
        dec = routed(e.prompt, choose)
        rows.append(mission_a._plan_metrics(dec, p.bem.tau))
    locked = [r["plan_length"] for r in rows]
    free = [r["plan_length_unconstrained"] for r in rows]
    assert max(locked) <= 3  # the horizon lock holds the decoded plan
    assert max(free) >= 4  # but the router wanted more
    assert all(r["flip_rate_unconstrained"] >= r["flip_rate"] for r in rows)
    cfg = load_gates(GATES)
    decision = evaluate_gates("mission_a", cfg, [], {"plan_length_unconstrained": free})
    gate = {o.gate: o for o in decision.gates}["plan_length"]
    assert gate.status == "failed" and decision.decision == "REJECTED"
    # the locked number would have passed: it is reported, never gated
    ok = evaluate_gates("mission_a", cfg, [], {"plan_length_unconstrained": locked})
    assert {o.gate: o for o in ok.gates}["plan_length"].status == "passed"


def test_evaluated_router_records_both_plan_lengths(micro: MicroRun) -> None:
    rows = [json.loads(line) for line in (micro.dirs["evaluate"] / "records.jsonl").open()]
    router = [r["metrics"] for r in rows if r["system"] == "router" and "em" in r["metrics"]]
    assert router and all(
        m["plan_length"] <= m["plan_length_unconstrained"] and m["plan_length"] <= 3 for m in router
    )
