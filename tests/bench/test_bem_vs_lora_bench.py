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
