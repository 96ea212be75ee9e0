"""bench/op_count.py: the counter counts kernels, not views, and the script's last line parses."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "op_count.py"


def _module() -> object:
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("op_count", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counter_counts_kernels_and_skips_views() -> None:
    op_count = _module()
    a, b = torch.ones(3, 4), torch.ones(4, 2)
    with op_count.OpCounter() as counter:  # type: ignore[attr-defined]
        c = (a @ b).t().unsqueeze(0)  # mm; t and unsqueeze launch nothing
        c.add_(1.0).expand(2, 2, 3).sum()  # add_, sum
    assert dict(counter.ops) == {"mm": 1, "add_": 1, "sum": 1}


def test_script_prints_every_phase_and_the_last_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[-4:-1]] == ["train", "prefill", "decode"]
    last = lines[-1].split()
    assert last[0] == "op_count:"
    fields = {k: float(v) for k, v in (kv.split("=") for kv in last[1:])}
    assert set(fields) == {
        "train_extra_per_site",
        "train_extra_per_site_cpu",
        "prefill_extra_per_site",
        "decode_extra_per_site",
        "merged_decode_over_base_per_site",
    }
    # The two trust-region paths differ only in training (inference uses the cached solve).
    assert fields["train_extra_per_site"] != fields["train_extra_per_site_cpu"]
    # Merged decoding inside a chunk is the base's one matmul per site; only the one chunk
    # boundary in the 32 counted steps (router, decision, plan) adds ops.
    assert 0 < fields["merged_decode_over_base_per_site"] < 1
    assert lines[-4].split()[5] == "-"  # the merged variant has no training step
