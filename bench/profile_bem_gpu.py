"""Where BEM's time goes on a GPU: torch.profiler tables of BEM vs LoRA (issue 17, point 1).

Builds the variants of ``bench/bem_vs_lora_gpu.py`` (same model, sites, ranks) and profiles a few
training steps (forward + backward) and decode steps of each, printing the top operators by
device time (CPU time on ``--device cpu``). It explains the ratios that script reports; it
asserts nothing and times nothing of its own.

Usage: PYTHONPATH=. python3 bench/profile_bem_gpu.py [--device cpu --tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bem_vs_lora_gpu import SIZES, _cache_of, build_variants  # noqa: E402

from bem_tasks.core import bem_streaming  # noqa: E402


def _train(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def _decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, *, bem: bool) -> None:
    with torch.inference_mode(), bem_streaming(model) if bem else nullcontext():
        out = model(input_ids=prompt, use_cache=True)
        cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="write the tables here as .txt")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = dict(SIZES["tiny" if args.tiny else "full"])
    ns = argparse.Namespace(rank=16, experts=4)
    models, _, info = build_variants(ns, size, device, dtype)
    print(f"model: {info['parameters']:,} parameters; {info['bem_sites']} BEM sites", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    train_ids = torch.randint(0, size["vocab"], (4, size["train_seq"]), generator=gen).to(device)
    prompt = torch.randint(0, size["vocab"], (1, size["prompt"]), generator=gen).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for variant in ("lora", "bem"):
        model = models[variant]
        for what in ("train", "decode"):
            model.train(what == "train")

            def run(m: torch.nn.Module = model, w: str = what, b: bool = variant == "bem") -> None:
                _train(m, train_ids) if w == "train" else _decode(m, prompt, 16, bem=b)

            run()  # warm-up
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(2 if what == "train" else 1):
                    run()
                if cuda:
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
            head = f"=== {variant} {what} (sorted by {sort})"
            print(head, table, sep="\n", flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"profile_{variant}_{what}.txt").write_text(head + "\n" + table)
        del models[variant]
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
