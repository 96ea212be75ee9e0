"""BEM vs peft LoRA vs the base model on a GPU: a ~1.1B Llama in bf16 (issue 17, point 3).

The GPU counterpart of ``bench/bem_vs_lora.py`` (same four variants, same rounds with a rotated
order, ratios = median over rounds of the within-round ratio). Model: a Llama built from config
with random weights (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 K/V heads,
intermediate 5632, vocab 32000, untied head: 1,100,048,384 parameters), everything in bf16
(the adapters too: LoRA with ``autocast_adapter_dtype=False``, BEM cast with the model; BEM's
trust-region solve runs in float32 internally).

  base  the model alone; its training step is full fine-tuning (every weight gets a gradient)
  lora  peft LoRA r=16, alpha=32, dropout 0 on self_attn.o_proj + mlp.down_proj, base frozen
  bem   BEM on the same sites, K=4 experts of rank 4 (total rank 16), alpha 32, chunk 32,
        tau 0.1, trust budget 1.0 (spectral and Frobenius), base frozen; soft routing in the
        training step, hard (chunk-sticky) at inference; U factors non-zero so routing and
        the trust region do real work
  bem_merged  the same BEM weights with ``merge_experts`` on (hard routing on W0 + D_k, the
        serving path): prefill and decoding only, its training step is bem's; its weights
        count the K merged copies of each site's base weight

Measured per variant (no optimizer step anywhere):
  prefill    inference forward (eval, inference_mode) at batch 8 x seq 2048: tokens/s
  train      forward + loss + backward at batch 4 x seq 2048: tokens/s
  decode_bN  greedy decoding with the K/V cache (transformers' DynamicCache, returned by
             ``model(input_ids=..., past_key_values=..., use_cache=True)``): prompt 512, then
             128 decode steps of one token per sequence, at batch 1 and 8; ms per step (BEM
             runs under ``bem_streaming`` so chunk routing carries across steps)
  peak memory per variant and phase: the variant's own weights + (max_memory_allocated during
             the measurement - memory allocated before it), i.e. what it would need alone (the
             three models share the GPU); GB = 1e9 bytes
  MFU        achieved model FLOP/s / the device's dense bf16 peak (``--peak-tflops``, default
             from the device name; required for unknown devices)

Model FLOPs (approximation, PaLM-style): forward FLOPs per token = 2 * N_matmul + 4 * n_layers
* ctx * d_model, where N_matmul counts every nn.Linear weight of the base model (attention and
MLP projections and the LM head; not the embedding, norms or adapters) and ctx is the attention
context (seq for prefill/training, without halving for the causal mask; the mean context over
the steps for decoding). Training = 3 x forward for every variant (the usual 6N convention; with a
frozen base LoRA/BEM skip the base weight gradients, so their real work is nearer 2 x forward:
``mfu_train_2x`` in the JSON uses that count). Decoding MFU is small by nature (it is memory- and
launch-bound); it is reported for completeness.

Everything runs in one process; the JSON (``--json``) is rewritten atomically after every round
of every block, so a run that dies still leaves numbers. A failure of one measurement (an OOM,
an API difference) is recorded and that measurement is skipped from then on; the others go on.
``--budget-s`` stops starting new rounds once the run would pass it. The last line is
machine-readable:
  bem_gpu: inference_ratio_vs_base=.. decode_ratio_vs_base_b1=.. decode_ratio_vs_base_b8=..
  train_step_ratio=.. mfu_base_prefill=.. mfu_bem_prefill=.. peak_gb_bem=..
  merged_inference_ratio_vs_base=.. merged_decode_ratio_vs_base_b1=.. .._b8=..
(the first ratios are the unmerged ``bem``'s, as in the first recorded run)

Usage (from the repository root):
  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/bem_vs_lora_gpu.py --json out.json
  PYTHONPATH=. python3 bench/bem_vs_lora_gpu.py --device cpu --tiny   # every code path, tiny
Imports only torch, transformers, peft, numpy, safetensors and bem_tasks.core.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bem_vs_lora import (  # noqa: E402
    _cpu_threads,
    _infer,
    _sync,
    _train_step,
    bem_variant,
)
from bem_vs_lora import decode_timed as _decode  # noqa: E402

from bem_tasks.core import (  # noqa: E402
    DEFAULT_SITES,
    bem_layers,
    build_model,
    count_bem_parameters,
)

VARIANTS = ("base", "lora", "bem", "bem_merged")
TRAINED = ("base", "lora", "bem")  # bem_merged's training step is bem's
INJECT_FAILURES: set[str] = set()  # "phase/variant" made to fail (--inject-failure, tests)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched on the device name (first hit).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5),
    ("H100 NVL", 835.5),
    ("H100 PCIE", 756.5),
    ("H200", 989.4),  # SXM
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
)

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "vocab": 32000,
        "d_model": 2048,
        "layers": 22,
        "heads": 32,
        "kv_heads": 4,
        "d_ff": 5632,
        "batch": 8,
        "seq": 2048,
        "train_batch": 4,
        "train_seq": 2048,
        "prompt": 512,
        "new_tokens": 128,
        "warmup_new_tokens": 16,
        "decode_batches": (1, 8),
        "rounds": 5,
        "decode_rounds": 3,
    },
    "tiny": {
        "vocab": 512,
        "d_model": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "d_ff": 128,
        "batch": 2,
        "seq": 64,
        "train_batch": 2,
        "train_seq": 64,
        "prompt": 40,  # decoding starts mid-chunk (chunk 32) and crosses a chunk boundary
        "new_tokens": 32,
        "warmup_new_tokens": 4,
        "decode_batches": (1, 2),
        "rounds": 2,
        "decode_rounds": 1,
    },
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def _env(device: torch.device) -> dict[str, Any]:
    import numpy
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            device_memory_gb=round(props.total_memory / 1e9, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def peak_tflops_for(name: str) -> float | None:
    upper = name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in upper:
            return tflops
    return None


class Results:
    """Every number of the run; ``save`` rewrites the JSON atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "script": "bench/bem_vs_lora_gpu.py",
            "status": "starting",
            "times": {},  # phase -> variant -> [seconds per round]
            "decode_prefill_s": {},  # phase -> variant -> [prompt forward seconds per round]
            "peak_gb": {},  # phase -> variant -> max over rounds
            "errors": {},  # phase -> variant -> message
            "block_elapsed_s": {},
        }

    def add(self, phase: str, variant: str, seconds: float, extra: float | None = None) -> None:
        self.data["times"].setdefault(phase, {}).setdefault(variant, []).append(seconds)
        if extra is not None:
            self.data["decode_prefill_s"].setdefault(phase, {}).setdefault(variant, []).append(
                extra
            )

    def peak(self, phase: str, variant: str, gb: float | None) -> None:
        if gb is None:
            return
        old = self.data["peak_gb"].setdefault(phase, {}).get(variant)
        self.data["peak_gb"][phase][variant] = gb if old is None else max(old, gb)

    def error(self, phase: str, variant: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"[:2000]
        self.data["errors"].setdefault(phase, {})[variant] = msg

    def failed(self, phase: str, variant: str) -> bool:
        return variant in self.data["errors"].get(phase, {})

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T_START, 2)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=2, sort_keys=True, default=str)
                fh.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _param_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _merged_weight_bytes(model: nn.Module) -> int:
    """Builds every BEM layer's merged weights W0 + D_k now (a cache the layer keeps until a
    parameter changes) and returns their bytes: part of what the merged variant holds."""
    with torch.inference_mode():
        return sum(
            t.numel() * t.element_size()
            for _, layer in bem_layers(model)
            for t in layer._merged_weights()
        )


def _matmul_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _measure(
    device: torch.device, weights_bytes: int, fn: Callable[[], Any]
) -> tuple[Any, float | None]:
    """Run ``fn``; returns (its result, peak GB the variant would need alone) (None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return result, (weights_bytes + peak - before) / 1e9


def _rotated(names: tuple[str, ...], rnd: int) -> list[str]:
    k = rnd % len(names)
    return list(names[k:] + names[:k])


def run_block(
    title: str,
    phases: list[tuple[str, tuple[str, ...], Callable[[str, bool], tuple[float, float | None]]]],
    models: dict[str, nn.Module],
    rounds: int,
    res: Results,
    device: torch.device,
    weights: dict[str, int],
    budget_s: float,
) -> None:
    """Round 0 is a warm-up; then ``rounds`` rounds of every phase for every variant in an order
    rotated each round. ``phases``: (name, variants, fn(variant, warmup) -> (seconds, extra))."""
    log(f"block {title}: warm-up + up to {rounds} rounds")
    t_block = time.perf_counter()
    last_round = 0.0
    for rnd in range(rounds + 1):
        elapsed = time.perf_counter() - T_START
        if rnd >= 2 and elapsed + last_round > budget_s:
            log(f"block {title}: stopping after {rnd - 1} rounds (budget {budget_s:.0f} s)")
            break
        t_round = time.perf_counter()
        for phase, variants, fn in phases:
            for variant in _rotated(variants, rnd):
                if res.failed(phase, variant):
                    continue

                call = functools.partial(fn, variant, rnd == 0)
                try:
                    if f"{phase}/{variant}" in INJECT_FAILURES:
                        raise RuntimeError(f"injected failure of {phase}/{variant} (test)")
                    (secs, extra), gb = _measure(device, weights[variant], call)
                except Exception as exc:  # keep the other measurements going
                    log(f"FAILED {phase}/{variant}: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                    res.error(phase, variant, exc)
                    models[variant].zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                res.peak(phase, variant, gb)
                if rnd:
                    res.add(phase, variant, secs, extra)
        last_round = time.perf_counter() - t_round
        res.data["block_elapsed_s"][title] = round(time.perf_counter() - t_block, 2)
        res.data["rounds_done"] = {**res.data.get("rounds_done", {}), title: rnd}
        res.save()
        log(f"block {title}: round {rnd}{' (warm-up)' if rnd == 0 else ''} {last_round:.1f} s")


def summarise(res: Results, ctx: dict[str, Any]) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = res.data["times"]
    peak: float | None = ctx["peak_tflops"]
    out: dict[str, Any] = {"median_s": {}, "tokens_per_s": {}, "mfu": {}, "ratios": {}}

    def paired(phase: str, a: str, b: str) -> float | None:
        xs, ys = times.get(phase, {}).get(a, []), times.get(phase, {}).get(b, [])
        n = min(len(xs), len(ys))
        return statistics.median(x / y for x, y in zip(xs[:n], ys[:n], strict=True)) if n else None

    for phase, per_variant in times.items():
        tokens, flops_per_token = ctx["phase_tokens"][phase], ctx["phase_flops"][phase]
        for variant, xs in per_variant.items():
            if not xs:
                continue
            med = statistics.median(xs)
            out["median_s"].setdefault(phase, {})[variant] = med
            out["tokens_per_s"].setdefault(phase, {})[variant] = tokens / med
            if peak:
                mfu = flops_per_token * tokens / med / (peak * 1e12)
                out["mfu"].setdefault(phase, {})[variant] = mfu
                if phase == "train":
                    out.setdefault("mfu_train_2x", {})[variant] = mfu * 2 / 3
    r = out["ratios"]
    r["inference_ratio_vs_base"] = paired("prefill", "bem", "base")
    r["lora_inference_ratio_vs_base"] = paired("prefill", "lora", "base")
    r["train_step_ratio"] = paired("train", "bem", "lora")
    r["lora_train_ratio_vs_base"] = paired("train", "lora", "base")
    r["bem_train_ratio_vs_base"] = paired("train", "bem", "base")
    r["merged_inference_ratio_vs_base"] = paired("prefill", "bem_merged", "base")
    for b in ctx["decode_batches"]:
        r[f"decode_ratio_vs_base_b{b}"] = paired(f"decode_b{b}", "bem", "base")
        r[f"merged_decode_ratio_vs_base_b{b}"] = paired(f"decode_b{b}", "bem_merged", "base")
        r[f"lora_decode_ratio_vs_base_b{b}"] = paired(f"decode_b{b}", "lora", "base")
        r[f"bem_vs_lora_decode_b{b}"] = paired(f"decode_b{b}", "bem", "lora")
    bem_peaks = [v["bem"] for v in res.data["peak_gb"].values() if "bem" in v]
    out["peak_gb_bem"] = max(bem_peaks) if bem_peaks else None
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_report(res: Results, summary: dict[str, Any], decode_batches: list[int]) -> None:
    med, tps, mfu = summary["median_s"], summary["tokens_per_s"], summary["mfu"]
    for phase in med:
        for variant in VARIANTS:
            if variant not in med[phase]:
                continue
            unit = (
                f"{med[phase][variant] * 1e3:8.2f} ms/step"
                if phase.startswith("decode")
                else f"{med[phase][variant] * 1e3:8.1f} ms"
            )
            gb = res.data["peak_gb"].get(phase, {}).get(variant)
            print(
                f"{phase:10s} {variant:10s} {unit}  {tps[phase][variant]:10.0f} tok/s  "
                f"MFU {_fmt(mfu.get(phase, {}).get(variant))}  peak {_fmt(gb, 2)} GB",
                flush=True,
            )
    for phase, errs in res.data["errors"].items():
        for variant, msg in errs.items():
            print(f"error {phase}/{variant}: {msg[:300]}", flush=True)
    print("ratios: " + json.dumps({k: _round(v) for k, v in summary["ratios"].items()}))
    r = summary["ratios"]
    m_pre = mfu.get("prefill", {})
    decode, merged = (
        " ".join(
            f"{prefix}decode_ratio_vs_base_b{b}={_fmt(r.get(f'{prefix}decode_ratio_vs_base_b{b}'))}"
            for b in decode_batches
        )
        for prefix in ("", "merged_")
    )
    print(
        f"bem_gpu: inference_ratio_vs_base={_fmt(r.get('inference_ratio_vs_base'))} {decode} "
        f"train_step_ratio={_fmt(r.get('train_step_ratio'))} "
        f"mfu_base_prefill={_fmt(m_pre.get('base'))} mfu_bem_prefill={_fmt(m_pre.get('bem'))} "
        f"peak_gb_bem={_fmt(summary['peak_gb_bem'], 2)} "
        f"merged_inference_ratio_vs_base={_fmt(r.get('merged_inference_ratio_vs_base'))} {merged}",
        flush=True,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama: exercise every code path")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak of --dtype")
    ap.add_argument("--rounds", type=int, default=None, help="prefill/train rounds")
    ap.add_argument("--decode-rounds", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps per run")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting rounds after")
    ap.add_argument("--rank", type=int, default=16, help="total rank (LoRA r, BEM sum r_k)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument(
        "--inject-failure",
        action="append",
        default=[],
        metavar="PHASE/VARIANT",
        help="make one measurement raise (tests the failure handling), e.g. decode_b1/lora",
    )
    args = ap.parse_args()
    INJECT_FAILURES.update(args.inject_failure)

    device = torch.device(args.device)
    size = dict(SIZES["tiny" if args.tiny else "full"])
    for key in ("rounds", "decode_rounds", "new_tokens"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bem_gpu: --device cuda but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(1 if args.tiny else _cpu_threads())

    res = Results(args.json)
    res.data["args"] = {k: str(v) for k, v in vars(args).items()}
    res.data["sizes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()}
    res.data["dtype"] = dtype_name
    env = _env(device)
    res.data["env"] = env
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops_for(env["device_name"])
        if peak is None:
            res.data["status"] = "unknown device: pass --peak-tflops"
            res.save()
            sys.exit(
                f"bem_gpu: unknown device {env['device_name']!r}: pass --peak-tflops "
                "(dense bf16 TFLOP/s) so MFU can be computed"
            )
    if peak is not None and dtype_name == "fp32" and args.peak_tflops is None:
        log("note: MFU is against the bf16 peak although the run is fp32")
    res.data["peak_tflops"] = peak
    log(f"env: {json.dumps(env)}; peak {peak} TFLOP/s ({dtype_name})")
    res.save()

    decode_batches = list(size["decode_batches"])
    ctx: dict[str, Any] = {"peak_tflops": peak, "decode_batches": decode_batches}
    summary: dict[str, Any] | None = None
    try:
        res.data["status"] = "building"
        models, weights, info = build_variants(args, size, device, dtype)
        res.data["model"] = info
        res.save()

        n_mm, d, n_layers = info["matmul_params"], size["d_model"], size["layers"]

        def fwd_flops(ctx_len: float) -> float:
            return 2.0 * n_mm + 4.0 * n_layers * ctx_len * d

        prompt_len, steps = size["prompt"], size["new_tokens"]
        ctx["phase_tokens"] = {
            "prefill": size["batch"] * size["seq"],
            "train": size["train_batch"] * size["train_seq"],
        }
        ctx["phase_flops"] = {
            "prefill": fwd_flops(size["seq"]),
            "train": 3.0 * fwd_flops(size["train_seq"]),
        }
        for b in decode_batches:
            ctx["phase_tokens"][f"decode_b{b}"] = b  # tokens per decode step
            ctx["phase_flops"][f"decode_b{b}"] = fwd_flops(prompt_len + (steps + 1) / 2)
        res.data["flops_per_token"] = ctx["phase_flops"]
        res.data["tokens_per_measurement"] = ctx["phase_tokens"]

        gen = torch.Generator().manual_seed(0)
        vocab = size["vocab"]

        def ids(b: int, s: int) -> torch.Tensor:
            return torch.randint(0, vocab, (b, s), generator=gen).to(device)

        pre_ids = ids(size["batch"], size["seq"])
        train_ids = ids(size["train_batch"], size["train_seq"])
        prompts = {b: ids(b, prompt_len) for b in decode_batches}
        infer_fns = {k: _infer(m, pre_ids) for k, m in models.items()}
        train_fns = {k: _train_step(m, train_ids) for k, m in models.items()}
        timed_sync = _sync

        def prefill(variant: str, warmup: bool) -> tuple[float, float | None]:
            models[variant].eval()
            timed_sync(device)
            t0 = time.perf_counter()
            infer_fns[variant]()
            timed_sync(device)
            return time.perf_counter() - t0, None

        def train(variant: str, warmup: bool) -> tuple[float, float | None]:
            m = models[variant]
            m.train()
            timed_sync(device)
            t0 = time.perf_counter()
            train_fns[variant]()
            timed_sync(device)
            secs = time.perf_counter() - t0
            m.zero_grad(set_to_none=True)  # free the gradients before the next measurement
            return secs, None

        def decoder(b: int) -> Callable[[str, bool], tuple[float, float | None]]:
            def fn(variant: str, warmup: bool) -> tuple[float, float | None]:
                m = models[variant]
                m.eval()
                n = size["warmup_new_tokens"] if warmup else steps
                pre_s, step_s = _decode(m, prompts[b], n, device, variant.startswith("bem"))
                return step_s, pre_s

            return fn

        res.data["status"] = "prefill/train"
        run_block(
            "prefill_train",
            [("prefill", VARIANTS, prefill), ("train", TRAINED, train)],
            models,
            size["rounds"],
            res,
            device,
            weights,
            args.budget_s,
        )
        res.data["status"] = "decode"
        run_block(
            "decode",
            [(f"decode_b{b}", VARIANTS, decoder(b)) for b in decode_batches],
            models,
            size["decode_rounds"],
            res,
            device,
            weights,
            args.budget_s,
        )
        res.data["status"] = "done"
    except Exception as exc:
        log(f"run aborted: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        res.data["status"] = f"aborted: {type(exc).__name__}: {exc}"[:2000]
    finally:
        if "phase_tokens" in ctx:
            summary = summarise(res, ctx)
            res.data["summary"] = summary
        res.save()
        log(f"finished ({res.data['status']}); JSON: {args.json}")
        print_report(
            res,
            summary
            or {"median_s": {}, "tokens_per_s": {}, "mfu": {}, "ratios": {}, "peak_gb_bem": None},
            decode_batches,
        )


def build_variants(
    args: argparse.Namespace, size: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, nn.Module], dict[str, int], dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    kwargs = {
        "vocab_size": size["vocab"],
        "d_model": size["d_model"],
        "n_layers": size["layers"],
        "n_heads": size["heads"],
        "n_kv_heads": size["kv_heads"],
        "d_ff": size["d_ff"],
        "max_positions": max(size["seq"], size["train_seq"], size["prompt"] + size["new_tokens"]),
        "seed": 0,
    }
    try:
        with torch.device(device):  # initialise on the GPU directly (fast)
            base = build_model("llama", **kwargs)
    except Exception as exc:
        log(f"building on {device} failed ({type(exc).__name__}: {exc}); building on CPU")
        base = build_model("llama", **kwargs)
    base = base.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in base.parameters())
    log(
        f"base Llama built in {time.perf_counter() - t0:.1f} s: {n_params:,} parameters, "
        f"attention {getattr(base.config, '_attn_implementation', '?')}, {dtype}, {device}"
    )
    sites = list(DEFAULT_SITES["llama"])
    lora_cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=sites
    )
    try:  # keep the adapters in the model's dtype (peft would upcast them to float32)
        lora = get_peft_model(copy.deepcopy(base), lora_cfg, autocast_adapter_dtype=False)
    except TypeError:  # a peft without the argument (< 0.12) keeps the base dtype anyway
        lora = get_peft_model(copy.deepcopy(base), lora_cfg)
    bem, report = bem_variant(base, sites, args.experts, args.rank)
    merged, _ = bem_variant(base, sites, args.experts, args.rank, merge=True)
    models: dict[str, nn.Module] = {
        "base": base,
        "lora": lora.to(device=device, dtype=dtype),
        "bem": bem.to(device=device, dtype=dtype),
        "bem_merged": merged.to(device=device, dtype=dtype),
    }
    for k, m in models.items():
        bad = {str(p.dtype) for p in m.parameters() if p.dtype != dtype}
        if bad:
            raise RuntimeError(f"{k}: parameters not in {dtype}: {bad}")
    trainable = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()
    }
    weights = {k: _param_bytes(m) for k, m in models.items()}
    weights["bem_merged"] += _merged_weight_bytes(models["bem_merged"])
    info = {
        "family": "llama",
        "parameters": n_params,
        "matmul_params": _matmul_params(base),
        "config": {k: v for k, v in kwargs.items() if k != "seed"},
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "trainable": trainable,
        "weights_gb": {k: v / 1e9 for k, v in weights.items()},
        "bem_sites": report.count,
        "bem_parameters": count_bem_parameters(bem),
        "sites": sites,
        "rank": args.rank,
        "experts": args.experts,
        "build_s": round(time.perf_counter() - t0, 2),
    }
    log(
        f"variants ready in {info['build_s']} s: {report.count} BEM sites; trainable "
        f"base {trainable['base']:,} lora {trainable['lora']:,} bem {trainable['bem']:,}; "
        f"matmul params {info['matmul_params']:,}"
    )
    return models, weights, info


if __name__ == "__main__":
    main()
