"""bench/bem_vs_lora.py in its --quick mode: every phase (prefill, training step, cached
decoding at batch 1 and 8, merged and unmerged BEM) and the --sweep table run, and the last
line parses. No timing assertions: speed targets are read off the full run (bench/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bem_vs_lora.py"


def _run(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_quick_run_prints_every_ratio() -> None:
    lines = _run("--sizes", "6x256")
    last = lines[-1]
    assert last.startswith("bem_vs_lora: ")
    fields = dict(kv.split("=") for kv in last.split()[1:])
    want = {
        "train_step_ratio",
        "inference_ratio_vs_base",
        "decode_ratio_vs_base",
        "inference_ratio_unmerged",
        "decode_ratio_unmerged",
        "inference_flops_vs_base",
    }
    assert set(fields) == want
    assert all(float(v) > 0 for v in fields.values())
    table = [line.split()[0] for line in lines if line.split() and line.split()[0] in
             ("infer", "train", "decode_b1", "decode_b8")]  # fmt: skip
    assert table == ["infer", "train", "decode_b1", "decode_b8"]


def test_quick_sweep_prints_a_row_per_length() -> None:
    lines = _run("--sweep")
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seq", "base"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [int(r[0]) for r in rows] == [64, 128]
    assert all(len(r) == 2 + 2 * 4 and all(float(v) > 0 for v in r[1:]) for r in rows)


def test_counted_flops_add_exactly_the_adapters_matmuls() -> None:
    """LoRA of rank r on a site adds x @ A and (x A) @ B: 2 * tokens * r * (d_in + d_out)
    FLOPs per site in the prefill; BEM adds the same two matmuls plus its router (a few
    FLOPs more, never fewer). No timing involved: the counts are exact."""
    import copy
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model

    spec = importlib.util.spec_from_file_location("bem_vs_lora_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    size = {"d": 64, "layers": 2, "heads": 2}
    base = bench._gpt2(size, 64)
    rank = 4
    cfg = LoraConfig(r=rank, lora_alpha=8, target_modules=bench.SITES, fan_in_fan_out=True)
    lora = get_peft_model(copy.deepcopy(base), cfg)
    bem, _ = bench.bem_variant(base, bench.SITES, 2, rank)
    ids = torch.randint(
        0, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)
    )
    flops = bench.counted_flops({"base": base, "lora": lora, "bem": bem}, ids, ids[:1])

    d, tokens, layers = 64, 2 * 64, 2
    per_layer = rank * ((d + d) + (4 * d + d))  # attn.c_proj 64->64, mlp.c_proj 256->64
    lora_extra = 2 * tokens * layers * per_layer
    assert flops["infer"]["lora"] - flops["infer"]["base"] == lora_extra
    bem_extra = flops["infer"]["bem"] - flops["infer"]["base"]
    assert lora_extra < bem_extra < 1.05 * lora_extra
    # Training counts forward and backward: LoRA and BEM cost about the same, full fine-tuning
    # (base) more, because it needs every weight's gradient.
    assert flops["train"]["base"] > flops["train"]["bem"] > flops["train"]["lora"]
