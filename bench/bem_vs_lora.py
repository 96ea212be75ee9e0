"""BEM vs peft LoRA vs the base model: one training step and one inference forward.

Same GPT-2 (6 layers, d=256, byte vocabulary) for all three variants:
  base  full model, no adapter (training step = full fine-tuning)
  lora  peft LoRA rank R on attn.c_proj + mlp.c_proj (Conv1D, fan_in_fan_out=True)
  bem   BEM on the same sites, K experts of rank R/K (total rank R), trust region on

Measurements run in rounds (every variant's inference pass, then every variant's training
step, order rotated each round); each ratio is the median over rounds of the within-round
ratio. Medians and minima per variant are printed too. The last line is machine-readable:
  bem_vs_lora: train_step_ratio=<BEM/LoRA> inference_ratio_vs_base=<BEM/base>

Usage: python bench/bem_vs_lora.py [--quick] [--repeats N] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bem_tasks.core import attach_bem, build_model, count_bem_parameters


def bem_variant(
    base: nn.Module, sites: list[str], experts: int, rank: int
) -> tuple[nn.Module, Any]:
    """A copy of ``base`` with BEM on ``sites``: ``experts`` experts of total rank ``rank``,
    alpha 2 * rank, the trust region on. Non-zero experts, so the trust region and routing do
    real work in the timed passes. Returns the model and attach_bem's report."""
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
    for name, p in bem.named_parameters():
        if name.endswith("bem_U"):
            nn.init.normal_(p, std=0.02)
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


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return timed


def _cpu_threads() -> int:
    # Cores this process may use (respects taskset / container limits), else os.cpu_count().
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16, help="total rank R (LoRA r and BEM sum r_k)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(_cpu_threads())
    timed = _timer(device)
    batch, seq = (2, 256) if args.quick else (8, 256)
    repeats = args.repeats or (3 if args.quick else 9)
    from peft import LoraConfig, get_peft_model

    base = build_model("gpt2", d_model=256, n_layers=6, n_heads=4, max_positions=seq, seed=0)
    sites = ["attn.c_proj", "mlp.c_proj"]
    lora_cfg = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=sites,
        fan_in_fan_out=True,
    )
    lora = get_peft_model(copy.deepcopy(base), lora_cfg)
    bem, report = bem_variant(base, sites, args.experts, args.rank)

    models = {"base": base.to(device), "lora": lora.to(device), "bem": bem.to(device)}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen).to(device)
    trainable = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
    }
    print(
        f"GPT-2 6x256 on {device}, batch {batch} x seq {seq}, threads {torch.get_num_threads()}, "
        f"repeats {repeats}; BEM {report.count} sites, K={args.experts}, total rank {args.rank}"
    )
    print(
        f"trainable params: base {trainable['base']:,}  lora {trainable['lora']:,}  "
        f"bem {trainable['bem']:,} (count_bem_parameters={count_bem_parameters(bem):,})"
    )

    # Rounds of: every variant's inference pass, then every variant's training step, in an
    # order rotated each round. Ratios are taken within a round (measurements seconds apart)
    # and the median over rounds is reported, so drifting background load largely cancels.
    results: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in models}
    fns = {
        "train": {k: _train_step(m, ids) for k, m in models.items()},
        "infer": {k: _infer(m, ids) for k, m in models.items()},
    }
    names = list(models)
    for rnd in range(repeats + 1):  # round 0 is warm-up
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for phase in ("infer", "train"):
            for k in order:
                models[k].train(phase == "train")
                t = timed(fns[phase][k])
                if rnd:
                    results[k][phase].append(t)

    med = {k: {p: statistics.median(v) for p, v in r.items()} for k, r in results.items()}
    for k, r in med.items():
        fastest = min(results[k]["train"]), min(results[k]["infer"])
        print(
            f"{k:5s} train step {r['train'] * 1e3:8.1f} ms (min {fastest[0] * 1e3:7.1f})   "
            f"inference {r['infer'] * 1e3:8.1f} ms (min {fastest[1] * 1e3:7.1f})"
        )

    def paired(a: str, b: str, phase: str) -> float:
        return statistics.median(
            x / y for x, y in zip(results[a][phase], results[b][phase], strict=True)
        )

    train_ratio = paired("bem", "lora", "train")
    infer_ratio = paired("bem", "base", "infer")
    print(
        f"paired ratios: lora/base train {paired('lora', 'base', 'train'):.3f}, "
        f"bem/base train {paired('bem', 'base', 'train'):.3f}, "
        f"lora/base infer {paired('lora', 'base', 'infer'):.3f}; ratio of medians: "
        f"bem/lora train {med['bem']['train'] / med['lora']['train']:.3f}, "
        f"bem/base infer {med['bem']['infer'] / med['base']['infer']:.3f}"
    )
    print(
        f"bem_vs_lora: train_step_ratio={train_ratio:.3f} inference_ratio_vs_base={infer_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
