"""Mission A evaluation as served: batched decoding, the decoder's own timing, KV reuse on a
shared-prefix workload, the unconstrained plan length, and the gates these feed (on the shared
micro run)."""

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
    decode_all,
    encode_items,
    greedy_chooser,
    length_buckets,
    shared_prefix,
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


def test_decoder_times_prefill_and_steps_apart(micro: MicroRun) -> None:
    """Known answer: a clock that reads the number of positions the model body has computed.
    Time to first token = the prompt's length (its prefill); each later token costs one."""
    routed, fused, p, codec = _systems(micro)
    prompt = encode_items(mission_a._read_split(micro.ctx("evaluate", micro.tmp), "test"), codec)
    for decoder in (routed, fused):
        computed = [0]
        body = decoder.body

        def counting(*, input_ids, body=body, computed=computed, **kw):
            computed[0] += input_ids.shape[1]
            return body(input_ids=input_ids, **kw)

        decoder.body = counting
        decoder._clock = lambda computed=computed: float(computed[0]) / 1e3  # "1 ms" a position
        for e in prompt[:3]:
            start = computed[0]
            d = decoder(e.prompt, greedy_chooser(p.bem.tau, p.router.plan_horizon))
            n = len(d.tokens)
            assert n > 1 and d.ttft_ms == pytest.approx(len(e.prompt))
            assert d.total_ms == pytest.approx(len(e.prompt) + n - 1) == computed[0] - start
            assert d.latency_per_token_ms == pytest.approx(1.0)  # the prefill is not spread


def test_length_buckets_need_no_padding(micro: MicroRun) -> None:
    prompts = [[1] * n for n in (3, 5, 3, 3, 5, 4)]
    buckets = length_buckets(prompts, 2)
    assert sorted(i for b in buckets for i in b) == list(range(6))
    assert all(len({len(prompts[i]) for i in b}) == 1 and len(b) <= 2 for b in buckets)
    _, fused, _, _ = _systems(micro)
    with pytest.raises(ValueError, match="prompts of one length"):
        fused.batch([[1, 2], [1, 2, 3]])


def test_a_prefix_cache_serves_one_request(micro: MicroRun) -> None:
    routed, fused, p, codec = _systems(micro)
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    q = codec.encode("k0=1;k1=2|min k0 k1\n")
    for decoder in (routed, fused):
        one = decoder.prefill(q[:5]).cache
        with pytest.raises(ValueError, match="one prompt, a one-row cache.*2 prompt"):
            decoder.batch([q, q], choose, prefix=one)
        two = decoder.prefill(q[:5]).cache
        two.batch_repeat_interleave(2)
        with pytest.raises(ValueError, match="a cache of 2 row"):
            decoder(q, choose, prefix=two)
        with pytest.raises(ValueError, match="at least its last token"):
            decoder(q[:5], choose, prefix=decoder.prefill(q[:5]).cache)
        assert decoder(q, choose, prefix=one).tokens == decoder(q, choose).tokens


# ---------------------------------------------------------------------------- KV reuse
def _workload(micro: MicroRun, p, codec, splits=("test",)):
    """evaluate's workload over the contexts of ``splits`` (the micro test split has 8)."""
    ctx = micro.ctx("evaluate", micro.tmp)
    items = [it for s in splits for it in mission_a._read_split(ctx, s)]
    return mission_a._serving_workload(items, {it.id for it in items}, p, codec)


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


def _long_context_groups(codec) -> list[list[list[int]]]:
    """Requests over a fact context three times as long as the micro suite's (10 facts)."""
    facts = ";".join(f"k{i % 4}={(3 * i) % 6}" for i in range(10))
    questions = ("min k0 k1", "max k2 k3", "add k1 k2", "sort k3 k0")
    return [[codec.encode(f"{facts}|{q}\n") for q in questions]]


def test_prefix_reuse_decodes_exactly_what_a_fresh_prefill_decodes(micro: MicroRun) -> None:
    routed, fused, p, codec = _systems(micro)
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    groups = [[e.prompt for e in g] for g in _workload(micro, p, codec)[:4]]
    long = _long_context_groups(codec)
    assert shared_prefix(long[0]) >= 2 * max(shared_prefix(g) for g in groups)
    for decoder in (routed, fused):
        caches = PrefixCache(decoder)
        for group in groups + long:
            n = shared_prefix(group)
            for i, prompt in enumerate(group):
                reused, cache = caches.serve(prompt, n)
                # the first request computes and stores the prefix; causal systems then serve
                # the whole shared prefix to every later request
                assert reused == (n if i else 0) and (cache is None) == (i == 0)
                if i:
                    assert cache.get_seq_length() == n
                served = decoder(prompt, choose, prefix=cache)
                fresh = decoder(prompt, choose)
                assert len(served.tokens) > 1
                assert (served.tokens, served.decisions) == (fresh.tokens, fresh.decisions)
        assert len(caches.store) == 5  # one stored prefix per distinct context


def _question_routed(ids: torch.Tensor) -> torch.Tensor:
    """Non-causal prompt routing: every prompt token goes to the expert the prompt's last
    question character picks (a later token decides how the prefix is computed)."""
    expert = ids[:, -2] % 3  # the character before the closing newline
    gates = torch.nn.functional.one_hot(expert, 3).float()
    return gates[:, None, :].expand(ids.shape[0], ids.shape[1], 3)


def _kv_ratios(decoder: RoutedDecoder, groups) -> list[float]:
    """Per context group (evaluate's record unit): reused prompt tokens / prompt tokens."""
    caches, out = PrefixCache(decoder), []
    for g in groups:
        n = shared_prefix([e.prompt for e in g])
        reused = sum(caches.serve(e.prompt, n)[0] for e in g)
        out.append(reused / sum(len(e.prompt) for e in g))
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
    groups = _workload(micro, p, codec, splits=("train", "dev", "test"))[:40]
    base = _kv_ratios(fused, groups)
    honest = _kv_ratios(causal, groups)
    lossy = _kv_ratios(leaky, groups)
    assert len(base) >= 30  # enough context groups for the gate's min_examples
    assert honest == base  # both causal: the same prefix served to every later request
    assert np.mean(lossy) < np.mean(base)
    assert min(lossy) == 0.0  # groups whose later questions all route the prefix differently
    # prefix K/V computed under the first question's routing cannot be reused by another
    # question unless that question happens to route the prefix the same way
    decision, gate = _kv_decision(lossy, base)
    assert gate.status == "failed" and decision.decision == "REJECTED"
    # the causal router passes it: its ratios equal the baseline's, inside the 1% margin
    _, gate = _kv_decision(honest, base)
    assert gate.status == "passed"


# ---------------------------------------------------------------------------- plan length
class _Restless(MacroRouter):
    """A macro-policy that wants a new expert at every decision: (segments used) mod 3."""

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        segs = feats[:, -(self.horizon + 1) :].argmax(-1)
        return 5.0 * torch.nn.functional.one_hot(segs % self.num_experts, self.num_experts)


def test_an_unconstrained_plan_beyond_the_horizon_fails_the_plan_gate(micro: MicroRun) -> None:
    routed, _, p, codec = _systems(micro, router=_Restless(32, horizon=3, hidden=4))
    ctx = micro.ctx("evaluate", micro.tmp)
    examples = encode_items(mission_a._read_split(ctx, "test"), codec)
    # evaluate's two decodes: with the horizon lock, and with a horizon no decode reaches
    locked = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    unlocked = greedy_chooser(p.bem.tau, routed.max_new)
    rows = [
        mission_a._plan_metrics(a, b)
        for a, b in zip(
            decode_all(routed, examples, 4, locked),
            decode_all(routed, examples, 4, unlocked),
            strict=True,
        )
    ]
    locked = [r["plan_length"] for r in rows]
    free = [r["plan_length_unconstrained"] for r in rows]
    assert max(locked) <= 3  # the horizon lock holds the decoded plan
    assert max(free) >= 4  # but the router, decoded without it, makes more
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


def test_base_kv_share_tells_a_perturbed_base_apart(micro: MicroRun) -> None:
    """evaluate's base_kv_share against a separately loaded base (the same weights: the router
    system's prompt K/V are the base model's), and against one whose second layer's attention
    input projection is perturbed (a negative control: only layer 0's K/V still match)."""
    routed, fused, p, codec = _systems(micro)
    ctx, _, _, _ = load_router_system(micro)
    base, _ = mission_a._load_base(ctx, p)
    plain = RoutedDecoder(base.eval(), eos_id=codec.eos_id, max_new_tokens=8, device="cpu")
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    groups = _workload(micro, p, codec)[:3]

    def shares() -> dict[str, set[float]]:
        kv = mission_a._kv_reuse(
            {"router": routed, "baseline": fused}, groups, choose, 4,
            lambda q: plain.prefill(q).cache,
        )  # fmt: skip
        assert kv["agreement"] == {"router": 1.0, "baseline": 1.0}
        out: dict[str, set[float]] = {"router": set(), "baseline": set()}
        for (_, system), m in kv["records"].items():
            out[system].add(m["base_kv_share"])
        return out

    assert shares() == {"router": {1.0}, "baseline": {0.5}}  # fused: layer 0's K/V escape it
    with torch.no_grad():
        base.transformer.h[1].attn.c_attn.weight.add_(0.01)
    assert shares() == {"router": {0.5}, "baseline": {0.5}}
