"""Mission A decode cost: the router system vs the fused baseline, per generated token.

Both systems are built in-process at the smoke size of experiments/mission_a_agentic_planner.yml
(base GPT-2, BEM sites, three rank-r experts + the macro-policy router vs one fused adapter at
parameter parity, chunk size and hysteresis from the `bem` block), with random weights (the BEM
`U` factors are made non-zero so every delta does real work). Each system decodes the same
suite prompts greedily with a K/V cache for a fixed number of tokens (EOS ignored, so both
generate exactly as many tokens), batch 1, exactly as evaluate's latency examples do.

Timing is interleaved: per prompt both systems decode back to back, alternating which goes
first; a round covers every prompt; the ratio is the median, over every prompt of every round,
of the ratio of the two back-to-back decodes' time per generated token after the first (the
decoder's own clock: ``Decoded.latency_per_token_ms``, what evaluate gates; the prompt prefill
is time to first token, printed apart). The last line is machine-readable:

    router_overhead: per_token_ratio=<router / fused baseline>

Usage: python bench/router_overhead.py [--rounds N] [--prompts N] [--tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from bem_tasks.config.loader import load_fleet
from bem_tasks.core import bem_layers, build_model
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data.suites.compositional import CompositionalConfig, make_compositional
from bem_tasks.missions import mission_a
from bem_tasks.missions.mission_a_params import MissionAParams
from bem_tasks.missions.planner import RoutedDecoder, TextCodec, greedy_chooser


def build_systems(p: MissionAParams) -> tuple[RoutedDecoder, RoutedDecoder, int]:
    """(router system decoder, fused baseline decoder, baseline rank) with random weights."""
    base = build_model(
        p.model.family,
        seed=0,
        d_model=p.model.n_embd,
        n_layers=p.model.n_layer,
        n_heads=p.model.n_head,
        max_positions=p.model.max_positions,
    ).eval()
    experts, fused = base, copy.deepcopy(base)
    mission_a._attach_experts(experts, p, 0, alpha=p.bem.alpha)
    router = mission_a._new_router(experts, p, 0)
    rank, _, _ = mission_a.fused_rank_at_parity(experts, router)  # train_experts' rule
    mission_a._attach_fused(fused, p, rank, 0, alpha=p.bem.alpha)
    gen = torch.Generator().manual_seed(1)
    for model in (experts, fused):
        for _, layer in bem_layers(model):
            with torch.no_grad():
                layer.bem_U.copy_(0.02 * torch.randn(layer.bem_U.shape, generator=gen))
        model.eval()
    kw = {"eos_id": -1, "max_new_tokens": p.evaluate.max_new_tokens, "device": "cpu"}
    routed = RoutedDecoder(experts, router=router, chunk=p.bem.chunk_size, **kw)
    return routed, RoutedDecoder(fused, **kw), rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=None, help="default: evaluate.max_new_tokens")
    ap.add_argument("--threads", type=int, default=1, help="1, like the smoke phases")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_fleet(None, "smoke").params["mission_a"]
    assert isinstance(p, MissionAParams)
    if args.tokens:
        p = p.model_copy(
            update={"evaluate": p.evaluate.model_copy(update={"max_new_tokens": args.tokens})}
        )
    routed, fused, rank = build_systems(p)
    d = p.data
    cfg = CompositionalConfig(
        n_keys=d.n_keys, min_facts=d.min_facts, max_facts=d.max_facts,
        value_min=d.value_min, value_max=d.value_max, ops=tuple(d.ops),
    )  # fmt: skip
    items = make_compositional(seed=7, sizes={"test": args.prompts}, config=cfg)["test"]
    codec = TextCodec(ByteTokenizer())
    prompts = [codec.encode(it.prompt) for it in items]
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    systems = {"router": lambda q: routed(q, choose), "baseline": lambda q: fused(q)}

    def one_round() -> list[dict[str, float]]:
        """(ms per generated token after the first, ms to the first token) of both systems on
        each prompt, decoded back to back."""
        pairs = []
        for i, q in enumerate(prompts):
            pair = {}
            for name in list(systems) if i % 2 == 0 else list(systems)[::-1]:
                out = systems[name](q)
                assert out.latency_per_token_ms is not None  # EOS ignored: every token made
                pair[name] = out.latency_per_token_ms
                pair[f"{name}_ttft"] = out.ttft_ms
            pairs.append(pair)
        return pairs

    one_round()  # warm-up
    rounds = [one_round() for _ in range(args.rounds)]
    # Median of the within-pair ratios: the two decodes of a pair run ~50 ms apart, so load
    # from other processes mostly hits both.
    ratios = [pr["router"] / pr["baseline"] for r in rounds for pr in r]
    print(
        f"smoke size: {p.model.n_layer} layers, width {p.model.n_embd}, "
        f"{len(mission_a.SKILLS)} experts of rank {p.bem.rank} vs fused rank {rank}, "
        f"chunk {p.bem.chunk_size}, {len(prompts)} prompts x {p.evaluate.max_new_tokens} tokens, "
        f"{args.rounds} rounds, {args.threads} thread(s)"
    )
    for s in systems:
        vals = [statistics.mean(pr[s] for pr in r) for r in rounds]
        ttft = statistics.median(pr[f"{s}_ttft"] for r in rounds for pr in r)
        print(
            f"{s:>8}: median {statistics.median(vals):.3f} ms/token, min {min(vals):.3f}; "
            f"time to first token median {ttft:.3f} ms"
        )
    print(f"router_overhead: per_token_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
