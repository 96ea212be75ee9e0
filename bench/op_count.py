"""Dispatched torch ops per adapter site: what BEM adds over peft LoRA, counted, not timed.

On a GPU a small op costs a kernel launch and its host-side dispatch whatever its size, so
where the device waits for the host (the GPU bench's training step and decoding: see
bench/README.md) the number of ops is the cost. Counts are exact and the same on every CPU, so
they can be read here for the GPU path (except composites CUDA fuses: BEM's router
``F.rms_norm`` is 18 ops per site in a training step here, 2 kernels on CUDA): the GPU bench's
Llama in its tiny shape at its sequence lengths, bf16, the same variants
(``bench/bem_vs_lora_gpu.py``), with BEM on the accelerator's path (``accelerator``: the trust
region's spectral bound, the hysteresis scan on the device) and on the CPU's (``cpu``:
eigen-solve, hysteresis in numpy).

Per phase: ops of a training step (forward + loss + backward), of a prefill forward, and of a
decode step (cached, one token, the mean over 32 steps crossing a chunk boundary), for the base
model (its training step is full fine-tuning), LoRA, BEM and BEM with ``merge_experts`` (the
serving path; no training step), and ``(BEM - LoRA) / sites``. Views (view, transpose,
expand, ...) are not counted: they launch nothing. Last line (machine-readable):
  op_count: train_extra_per_site=<accelerator path> train_extra_per_site_cpu=..
  prefill_extra_per_site=.. decode_extra_per_site=..
  merged_decode_over_base_per_site=<(BEM merged - base) / sites>

Sites share one batched trust-region solve per training forward, so the extra per site falls
as sites are added: ``--layers 22`` counts at the GPU bench's 44 sites (tiny width: the count
does not depend on it).

Usage: python bench/op_count.py [--layers N]
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bem_vs_lora import decode_timed  # noqa: E402
from bem_vs_lora_gpu import SIZES, build_variants  # noqa: E402

from bem_tasks.core import bem as bem_module  # noqa: E402

VIEWS = frozenset(
    [
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "alias",
        "as_strided",
        "detach",
        "lift_fresh",
        "t",
        "transpose",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "diagonal",
    ]
)


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher's kernels, views excepted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], object]) -> int:
    fn()  # warm: caches (the eval trust scale, merged weights) are built outside the count
    with OpCounter() as counter:
        fn()
    return sum(counter.ops.values())


def phase_counts(
    model: torch.nn.Module, bem: bool, size: dict[str, Any], *, train: bool = True
) -> dict[str, float]:
    ids = torch.randint(0, size["vocab"], (size["train_batch"], size["train_seq"]))
    prompt = torch.randint(0, size["vocab"], (1, size["prompt"]))
    device = torch.device("cpu")

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    def decode(steps: int) -> Callable[[], object]:
        return lambda: decode_timed(model, prompt, steps, device, bem)

    counts = {}
    if train:
        model.train()
        counts["train"] = float(count(train_step))
    model.eval()
    counts["prefill"] = float(count(prefill))
    counts["decode"] = (count(decode(64)) - count(decode(32))) / 32
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--layers",
        type=int,
        default=SIZES["tiny"]["layers"],
        help="decoder layers (22: the GPU bench's count of sites, at tiny width)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    # The GPU bench's sequence lengths (the hysteresis scan's ops grow with the chunks per
    # sequence); new_tokens 64: the positions cover the prompt and the 64 counted decode steps.
    full = SIZES["full"]
    size = {
        **SIZES["tiny"],
        "layers": args.layers,
        "train_seq": full["train_seq"],
        "prompt": full["prompt"],
        "new_tokens": 64,
    }
    variant_args = argparse.Namespace(rank=16, experts=4)
    models, _, info = build_variants(variant_args, size, torch.device("cpu"), torch.bfloat16)
    sites = info["bem_sites"]
    base = phase_counts(models["base"], False, size)
    lora = phase_counts(models["lora"], False, size)
    bem: dict[str, dict[str, float]] = {}
    real = bem_module._uses_eigen_solver, bem_module._decides_on_host
    try:  # each path's trust-region solve and hysteresis rule (the scan on an accelerator)
        for path, on_host in (("cpu", True), ("accelerator", False)):
            host = lambda device, on_host=on_host: on_host  # noqa: E731
            bem_module._uses_eigen_solver = bem_module._decides_on_host = host  # type: ignore[assignment]
            bem[path] = phase_counts(models["bem"], True, size)
        merged = phase_counts(models["bem_merged"], True, size, train=False)
    finally:
        bem_module._uses_eigen_solver, bem_module._decides_on_host = real
    print(
        f"Llama tiny width, {args.layers} layers (bf16, {sites} BEM sites, K=4 of rank 4; "
        "LoRA r=16), ops per call:"
    )
    print(
        f"{'phase':10s} {'base':>9s} {'lora':>9s} {'bem accel':>10s} {'bem cpu':>9s} "
        f"{'merged':>9s}  BEM's extra over LoRA per site (accel / cpu)"
    )
    extra: dict[str, float] = {}
    for phase in ("train", "prefill", "decode"):
        acc = (bem["accelerator"][phase] - lora[phase]) / sites
        cpu = (bem["cpu"][phase] - lora[phase]) / sites
        extra[phase], extra[phase + "_cpu"] = acc, cpu
        merged_ops = f"{merged[phase]:9.1f}" if phase in merged else f"{'-':>9s}"
        print(
            f"{phase:10s} {base[phase]:9.1f} {lora[phase]:9.1f} {bem['accelerator'][phase]:10.1f} "
            f"{bem['cpu'][phase]:9.1f} {merged_ops}  {acc:.1f} / {cpu:.1f}"
        )
    merged_decode = (merged["decode"] - base["decode"]) / sites
    print(
        f"op_count: train_extra_per_site={extra['train']:.1f} "
        f"train_extra_per_site_cpu={extra['train_cpu']:.1f} "
        f"prefill_extra_per_site={extra['prefill']:.1f} decode_extra_per_site={extra['decode']:.1f} "
        f"merged_decode_over_base_per_site={merged_decode:.1f}"
    )


if __name__ == "__main__":
    main()
