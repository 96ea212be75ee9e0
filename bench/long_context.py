"""Mission E's streaming path: tokens/s and peak memory at two lengths (memory stays bounded).

Each length runs in a fresh subprocess, so each peak is its own. The model is the experiment's
backbone (experiments/mission_e_long_memory.yml, `--profile`) with the memory system's recall
module, built from config with random weights (speed and memory do not depend on training;
accuracy would, and is not reported here). A Suite E item of the length is streamed at batch 1
the way long_context_evaluation does (no logits kept past their chunk).

    peak_mb    CPU: the child's peak RSS while streaming (the kernel's high-water mark, reset
               after the model is built and WARMUP_TOKENS are streamed); CUDA:
               torch.cuda.max_memory_allocated while streaming
    stream_mb  peak_mb minus the memory held just before streaming: what streaming itself adds

Last line: ``long_context: tokens_per_s=.. peak_mb_4k=.. peak_mb_16k=.. stream_mb_4k=..
stream_mb_16k=..`` (target: peak at 16k within 1.2x of 4k). stream_mb is a few MB at any length
(the CPU allocator wanders by up to about 10 MB); with --keep-logits it grows by about 2 MB per
1k tokens. ``--keep-logits`` keeps every chunk's logits (a negative control: memory
then grows with length). ``--device cuda --profile full --lengths 131072`` is the GPU check: one
128k-token streaming evaluation of the full-profile architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Streamed before measuring: the CPU allocator's RSS settles after a few thousand tokens
# (measured: it wanders within about 5 MB from then on, at any length).
WARMUP_TOKENS = 8192
sys.path.insert(0, str(ROOT))


def _backbone(profile: str) -> tuple[dict, dict]:
    import yaml

    doc = yaml.safe_load((ROOT / "experiments" / "mission_e_long_memory.yml").read_text())
    params = doc["params"]
    over = (doc.get("profiles", {}).get(profile) or {}).get("params", {})
    backbone = {**params["backbone"], **over.get("backbone", {})}
    recall = {**params["recall"], **over.get("recall", {})}
    return backbone, recall


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0), so the
    peak measured is the streaming's, not the setup's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(length: int, profile: str, device: str, keep_logits: bool) -> dict:
    import torch

    from bem_tasks.core.long_memory import WindowLM, WindowLMConfig, attach_recall
    from bem_tasks.core.tokenizer import ByteTokenizer
    from bem_tasks.data.suites.long_context import make_long_context
    from bem_tasks.missions.mission_e import encode, stream_score

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    tok = ByteTokenizer()
    b, r = _backbone(profile)
    cfg = WindowLMConfig(tok.vocab_size, **b)
    torch.manual_seed(0)
    model = WindowLM(cfg)
    layer = attach_recall(
        model, use_memory=True, d_mem=r["d_mem"], kernel=r["kernel"], slots=r["slots"], seed=0, num_experts=4,
        rank=4, alpha=16.0, chunk_size=1, trust_budget=None,
    )  # fmt: skip
    with torch.no_grad():
        layer.bem_U.normal_(0, 0.02)  # a non-zero read path, as after training
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    item = make_long_context(
        seed=0, train_lengths=(length,), eval_lengths=(length,), depths=(0.5,),
        kinds=("single",), n_train_per_cell=1, n_dev_per_cell=1, n_test_per_cell=1,
    )["test"][0]  # fmt: skip
    e = encode(item, tok)
    with torch.no_grad():  # warm up the allocator: WARMUP_TOKENS streamed, then dropped
        warm = model.new_stream(1)
        for _ in range(0, WARMUP_TOKENS, cfg.chunk):
            model.step(warm, torch.randint(0, 256, (1, cfg.chunk), device=device))
        del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()
        before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if keep_logits:
        with torch.no_grad():
            kept = model(torch.tensor([e.ids], device=device))  # every logit kept: grows with L
        state_bytes = 0
        del kept
    else:
        sc = stream_score(model, e)
        state_bytes = sc.memory_bytes
    if device == "cuda":
        torch.cuda.synchronize()
        total = torch.cuda.max_memory_allocated() / 2**20
    else:
        total = _status_mb("VmHWM")
    seconds = time.perf_counter() - t0
    return {
        "length": len(e.ids), "seconds": seconds, "tokens_per_s": len(e.ids) / seconds,
        "peak_mb": total, "stream_mb": total - before, "memory_state_bytes": state_bytes, "device": device,
        "profile": profile, "window": cfg.window, "chunk": cfg.chunk,
    }  # fmt: skip


def run(lengths: list[int], profile: str, device: str, keep_logits: bool) -> list[dict]:
    out = []
    for n in lengths:
        cmd = [sys.executable, __file__, "--child", str(n), "--profile", profile,
               "--device", device] + (["--keep-logits"] if keep_logits else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"length {n}: {proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-logits", action="store_true")
    ap.add_argument("--json", default=None, help="write the rows here too")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.profile, args.device, args.keep_logits)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = run(lengths, args.profile, args.device, args.keep_logits)
    for r in rows:
        print(
            f"length={r['length']} tokens_per_s={r['tokens_per_s']:.0f} peak_mb={r['peak_mb']:.1f} "
            f"stream_mb={r['stream_mb']:.2f} state_bytes={r['memory_state_bytes']} "
            f"seconds={r['seconds']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    (a, first), (b, last) = (lengths[0], rows[0]), (lengths[-1], rows[-1])
    print(
        f"long_context: tokens_per_s={last['tokens_per_s']:.0f} "
        f"peak_mb_{_k(a)}={first['peak_mb']:.1f} peak_mb_{_k(b)}={last['peak_mb']:.1f} "
        f"stream_mb_{_k(a)}={first['stream_mb']:.2f} stream_mb_{_k(b)}={last['stream_mb']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
