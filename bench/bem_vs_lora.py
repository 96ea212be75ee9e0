"""BEM vs peft LoRA vs the base model: training step, inference forward and cached decoding.

Same GPT-2 (byte vocabulary) for every variant, at two sizes built from config (no download):
6 layers x 256 and 12 layers x 768 (the GPT-2 small shape):
  base        full model, no adapter (training step = full fine-tuning)
  lora        peft LoRA rank R on attn.c_proj + mlp.c_proj (Conv1D, fan_in_fan_out=True)
  bem         BEM on the same sites, K experts of rank R/K (total rank R), trust region on;
              the default (unmerged) inference path
  bem_merged  the same BEM weights with ``merge_experts`` on (hard routing on W0 + D_k,
              K extra copies of each site's weight); inference and decoding only (its
              training step is bem's)

Phases per size: ``train`` (forward + loss + backward, no optimizer step), ``infer`` (one
forward in eval under inference_mode: the prefill), ``decode_b1`` / ``decode_b8`` (greedy
decoding with the K/V cache after a prompt, one token per sequence per step, batch 1 and 8:
seconds per generated token; BEM under ``bem_streaming``, crossing chunk boundaries).

Measurements run in rounds (each phase for every variant, order rotated each round); each
ratio is the median over rounds of the within-round ratio. Per-size lines, then the last line
(machine-readable; the worst over the sizes; inference and decode for ``bem_merged``, the
serving path, with the unmerged path's ratios after them):
  bem_vs_lora: train_step_ratio=<BEM/LoRA> inference_ratio_vs_base=<BEM/base>
  decode_ratio_vs_base=<BEM/base per token, worst of b1/b8> inference_ratio_unmerged=..
  decode_ratio_unmerged=.. inference_flops_vs_base=<FLOPs of BEM merged's prefill / base's>
The last field is counted, not timed (torch.utils.flop_counter): the time ratio a machine
running every matmul at one efficiency would give, so no timing of an unmerged rank-R adapter
can beat it.

``--sweep`` instead times BEM vs base inference at batch 1 as the sequence length (256, 1024,
4096) and the number of experts (1, 2, 4, 8; total rank R) grow, on the 6 x 256 model.

Usage: python bench/bem_vs_lora.py [--quick] [--sweep] [--rounds N] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from bem_tasks.core import attach_bem, bem_layers, bem_streaming, build_model, count_bem_parameters

SITES = ["attn.c_proj", "mlp.c_proj"]

# name -> model shape, prefill / training batch, decoding prompt and steps, rounds
SIZES: dict[str, dict[str, Any]] = {
    "6x256": {"d": 256, "layers": 6, "heads": 4, "batch": 8, "seq": 256, "train_batch": 8,
              "prompt": 100, "steps": 64, "rounds": 7},
    "12x768": {"d": 768, "layers": 12, "heads": 12, "batch": 2, "seq": 256, "train_batch": 1,
               "prompt": 100, "steps": 32, "rounds": 4},
}  # fmt: skip
QUICK: dict[str, dict[str, Any]] = {
    "6x256": {**SIZES["6x256"], "batch": 2, "seq": 128, "train_batch": 2, "prompt": 28,
              "steps": 8, "rounds": 1},
    "12x768": {**SIZES["12x768"], "batch": 1, "seq": 64, "train_batch": 1, "prompt": 28,
               "steps": 8, "rounds": 1},
}  # fmt: skip
DECODE_BATCHES = (1, 8)
SWEEP_SEQS = {256: 15, 1024: 7, 4096: 3}  # sequence length -> rounds (about 5-30 s each)
SWEEP_EXPERTS = (1, 2, 4, 8)


def bem_variant(
    base: nn.Module, sites: list[str], experts: int, rank: int, *, merge: bool = False
) -> tuple[nn.Module, Any]:
    """A copy of ``base`` with BEM on ``sites``: ``experts`` experts of total rank ``rank``,
    alpha 2 * rank, the trust region on. Non-zero experts, so the trust region and routing do
    real work in the timed passes. ``merge``: merged inference on. Returns the model and
    attach_bem's report."""
    bem = copy.deepcopy(base)
    report = attach_bem(
        bem,
        sites=sites,
        num_experts=experts,
        rank=rank // experts,
        alpha=2.0 * rank,
        chunk_size=32,
        tau=0.1,
        trust_budget=1.0,
        seed=0,
    )
    # Its own generator: every call gives the same experts, so `bem` and `bem_merged` (two calls)
    # time the same weights and routing (attach_bem restores the global generator it seeds).
    gen = torch.Generator(device=next(bem.parameters()).device).manual_seed(0)
    for name, p in bem.named_parameters():
        if name.endswith("bem_U"):
            nn.init.normal_(p, std=0.02, generator=gen)
    for _, layer in bem_layers(bem):
        layer.merge_experts = merge
    return bem, report


def _train_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    return step


def _infer(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def fwd() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return fwd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def timed(fn: Callable[[], None]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    return timed


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before 5.2x names it `past_key_values`
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the model returned no K/V cache with use_cache=True")
    return cache


def decode_timed(
    model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device, bem: bool
) -> tuple[float, float]:
    """Greedy decoding with the K/V cache: (prompt forward seconds, seconds per decode step).
    BEM runs under ``bem_streaming`` so chunk routing carries across the steps."""
    # transformers renamed the cache argument from `past_key_values` to `cache` (5.2x).
    unwrap = getattr(model, "get_base_model", None)  # a peft model: ask the model it wraps
    params = inspect.signature((unwrap() if unwrap else model).forward).parameters
    kwarg = "cache" if "cache" in params else "past_key_values"
    streaming = bem_streaming(model) if bem else nullcontext()
    with torch.inference_mode(), streaming:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        cache = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, use_cache=True, **{kwarg: cache})
            cache = _cache_of(out)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
    # The cache must hold prompt + steps positions, or the steps did not use it.
    seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
    if seen is not None and int(seen) != prompt.shape[1] + steps:
        raise RuntimeError(f"K/V cache holds {seen} positions, expected {prompt.shape[1] + steps}")
    return t1 - t0, (t2 - t1) / steps


def _cpu_threads() -> int:
    # Cores this process may use (respects taskset / container limits), else os.cpu_count().
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def counted_flops(
    models: dict[str, nn.Module], infer_ids: torch.Tensor, train_ids: torch.Tensor
) -> dict[str, dict[str, int]]:
    """FLOPs each variant's prefill and training step execute, counted op by op by
    ``torch.utils.flop_counter`` (matmuls and attention; elementwise ops are not counted).
    Their ratio is what the time ratio would be if every matmul ran at one efficiency."""
    from torch.utils.flop_counter import FlopCounterMode

    flops: dict[str, dict[str, int]] = {"infer": {}, "train": {}}
    for k, m in models.items():
        m.eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            m(input_ids=infer_ids)
        flops["infer"][k] = counter.get_total_flops()
        if k != "bem_merged":  # its training step is bem's
            m.train()
            with FlopCounterMode(display=False) as counter:
                m(input_ids=train_ids, labels=train_ids).loss.backward()
            m.zero_grad(set_to_none=True)
            flops["train"][k] = counter.get_total_flops()
    return flops


def _paired(xs: list[float], ys: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


def _gpt2(size: dict[str, Any], max_positions: int) -> Any:
    return build_model(
        "gpt2",
        d_model=size["d"],
        n_layers=size["layers"],
        n_heads=size["heads"],
        max_positions=max_positions,
        seed=0,
    )


def run_size(
    name: str, size: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """Every phase for every variant at one model size; prints a table, returns the ratios."""
    from peft import LoraConfig, get_peft_model

    timed = _timer(device)
    rounds = args.rounds or size["rounds"]
    max_pos = max(size["seq"], size["prompt"] + size["steps"])
    base = _gpt2(size, max_pos)
    lora_cfg = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=SITES,
        fan_in_fan_out=True,
    )
    lora = get_peft_model(copy.deepcopy(base), lora_cfg)
    bem, report = bem_variant(base, SITES, args.experts, args.rank)
    merged, _ = bem_variant(base, SITES, args.experts, args.rank, merge=True)
    models = {"base": base, "lora": lora, "bem": bem, "bem_merged": merged}
    models = {k: m.to(device) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size

    def ids(b: int, s: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, s), generator=gen).to(device)

    infer_ids, train_ids = ids(size["batch"], size["seq"]), ids(size["train_batch"], size["seq"])
    prompts = {b: ids(b, size["prompt"]) for b in DECODE_BATCHES}
    trainable = {
        k: sum(p.numel() for p in models[k].parameters() if p.requires_grad) for k in models
    }
    print(
        f"\n== GPT-2 {name} ({size['layers']} layers x {size['d']}) on {device}, threads "
        f"{torch.get_num_threads()}, {rounds} rounds: infer batch {size['batch']} x "
        f"{size['seq']}, train batch {size['train_batch']} x {size['seq']}, decode prompt "
        f"{size['prompt']} + {size['steps']} steps at batch {DECODE_BATCHES}; BEM "
        f"{report.count} sites, K={args.experts}, total rank {args.rank}",
        flush=True,
    )
    print(
        f"trainable params: base {trainable['base']:,}  lora {trainable['lora']:,}  "
        f"bem {trainable['bem']:,} (count_bem_parameters={count_bem_parameters(bem):,})"
    )
    flops = counted_flops(models, infer_ids, train_ids)
    infer_flops = {k: flops["infer"][k] / flops["infer"]["base"] for k in models}
    print(
        "counted FLOPs: prefill vs base "
        + " ".join(f"{k} {v:.4f}" for k, v in infer_flops.items())
        + f"; train step bem/lora {flops['train']['bem'] / flops['train']['lora']:.4f}"
    )

    def decoder(b: int) -> Callable[[str, bool], float]:
        def fn(k: str, warm: bool) -> float:
            models[k].eval()
            steps = max(2, size["steps"] // 4) if warm else size["steps"]
            return decode_timed(models[k], prompts[b], steps, device, k.startswith("bem"))[1]

        return fn

    def infer(k: str, warm: bool) -> float:
        models[k].eval()
        return timed(_infer(models[k], infer_ids))

    def train(k: str, warm: bool) -> float:
        models[k].train()
        t = timed(_train_step(models[k], train_ids))
        models[k].zero_grad(set_to_none=True)
        return t

    everyone = list(models)
    phases: list[tuple[str, list[str], Callable[[str, bool], float]]] = [
        ("infer", everyone, infer),
        ("train", ["base", "lora", "bem"], train),
        *((f"decode_b{b}", everyone, decoder(b)) for b in DECODE_BATCHES),
    ]
    # Rounds of every phase for every variant, in an order rotated each round. Ratios are
    # taken within a round (measurements seconds apart) and the median over rounds is
    # reported, so drifting background load largely cancels.
    times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in ks} for p, ks, _ in phases}
    t_start = time.perf_counter()
    for rnd in range(rounds + 1):  # round 0 is warm-up
        for phase, variants, fn in phases:
            shift = rnd % len(variants)
            for k in variants[shift:] + variants[:shift]:
                t = fn(k, rnd == 0)
                if rnd:
                    times[phase][k].append(t)
    print(f"({time.perf_counter() - t_start:.0f} s)")

    print(f"{'phase':10s}" + "".join(f"{k:>14s}" for k in everyone) + "   median ms (min)")
    for phase, variants, _ in phases:
        cells = [
            f"{statistics.median(times[phase][k]) * 1e3:8.2f} ({min(times[phase][k]) * 1e3:.1f})"
            if k in variants
            else "-"
            for k in everyone
        ]
        print(f"{phase:10s}" + "".join(f"{c:>14s}" for c in cells))

    def ratio(phase: str, a: str, b: str) -> float:
        return _paired(times[phase][a], times[phase][b])

    decode = [f"decode_b{b}" for b in DECODE_BATCHES]
    r = {
        "train_step_ratio": ratio("train", "bem", "lora"),
        "inference_ratio_vs_base": ratio("infer", "bem_merged", "base"),
        "decode_ratio_vs_base": max(ratio(p, "bem_merged", "base") for p in decode),
        "inference_ratio_unmerged": ratio("infer", "bem", "base"),
        "decode_ratio_unmerged": max(ratio(p, "bem", "base") for p in decode),
        "inference_flops_vs_base": infer_flops["bem_merged"],
    }

    def quartiles(phase: str, a: str, b: str) -> str:
        # The spread of the within-round ratios: how far one run on this machine can be trusted.
        rs = [x / y for x, y in zip(times[phase][a], times[phase][b], strict=True)]
        if len(rs) < 2:
            return ""
        q1, _, q3 = statistics.quantiles(rs, n=4)
        return f" [{q1:.3f}, {q3:.3f}]"

    print(
        "paired ratios (median [quartiles] over rounds): "
        + ", ".join(
            f"{phase} {a}/{b} {ratio(phase, a, b):.3f}{quartiles(phase, a, b)}"
            for phase, pairs in (
                ("train", [("lora", "base"), ("bem", "base"), ("bem", "lora")]),
                *(
                    (p, [("lora", "base"), ("bem", "base"), ("bem_merged", "base")])
                    for p in ("infer", *decode)
                ),
            )
            for a, b in pairs
        )
    )
    print(f"bem_vs_lora[{name}]: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    return r


def sweep(args: argparse.Namespace, device: torch.device) -> None:
    """BEM / base inference time at batch 1 over sequence lengths and numbers of experts."""
    timed = _timer(device)
    size = SIZES["6x256"]
    seqs = {64: 1, 128: 1} if args.quick else SWEEP_SEQS
    base = _gpt2(size, max(seqs)).to(device).eval()
    variants: dict[str, nn.Module] = {"base": base}
    for experts in SWEEP_EXPERTS:
        for merge in (False, True):
            bem, _ = bem_variant(base, SITES, experts, args.rank, merge=merge)
            variants[f"K{experts}{'m' if merge else ''}"] = bem.to(device).eval()
    print(
        f"sweep: GPT-2 6x256 on {device}, batch 1, threads {torch.get_num_threads()}, rounds "
        f"{seqs}; BEM total rank {args.rank} split over K experts; ratio = median of "
        "within-round BEM / base (merged: merge_experts on)"
    )
    print(
        f"{'seq':>6s} {'base ms':>9s}"
        + "".join(f"{f'K={k}':>9s}{'merged':>8s}" for k in SWEEP_EXPERTS)
    )
    gen = torch.Generator().manual_seed(0)
    for seq, seq_rounds in seqs.items():
        rounds = args.rounds or seq_rounds
        ids = torch.randint(0, base.config.vocab_size, (1, seq), generator=gen).to(device)
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for rnd in range(rounds + 1):
            shift = rnd % len(names)
            for k in names[shift:] + names[:shift]:
                t = timed(_infer(variants[k], ids))
                if rnd:
                    times[k].append(t)
        row = f"{seq:6d} {statistics.median(times['base']) * 1e3:9.1f}"
        for experts in SWEEP_EXPERTS:
            row += f"{_paired(times[f'K{experts}'], times['base']):9.3f}"
            row += f"{_paired(times[f'K{experts}m'], times['base']):8.3f}"
        print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches, one round (smoke)")
    ap.add_argument("--sweep", action="store_true", help="inference cost vs seq len and K")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(SIZES))
    ap.add_argument("--rank", type=int, default=16, help="total rank R (LoRA r and BEM sum r_k)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(_cpu_threads())
    if args.sweep:
        sweep(args, device)
        return
    table = QUICK if args.quick else SIZES
    names = args.sizes.split(",") if args.sizes else list(table)
    results = {name: run_size(name, table[name], args, device) for name in names}
    worst = {k: max(r[k] for r in results.values()) for k in next(iter(results.values()))}
    print("bem_vs_lora: " + " ".join(f"{k}={v:.3f}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
