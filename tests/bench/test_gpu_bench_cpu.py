"""bench/bem_vs_lora_gpu.py in its --tiny CPU mode: every code path (peft LoRA, BEM attach,
prefill, training step, cached decoding, JSON, failure isolation) runs, with pydantic and
airflow unimportable as on the GPU machine, so the script does not rot between device runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bem_vs_lora_gpu.py"


def test_gpu_bench_tiny_cpu(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("pydantic", "airflow"):  # absent on the GPU machine
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is blocked')\n")
    out = tmp_path / "bem_gpu.json"
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)]
        + ["--peak-tflops", "1", "--inject-failure", "decode_b1/lora"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("bem_gpu: inference_ratio_vs_base=")
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert {"decode_ratio_vs_base_b1", "train_step_ratio", "mfu_bem_prefill"} <= set(fields)
    assert {"merged_inference_ratio_vs_base", "merged_decode_ratio_vs_base_b2"} <= set(fields)
    assert fields["train_step_ratio"] != "nan"

    data = json.loads(out.read_text())
    assert data["status"] == "done"
    assert data["model"]["bem_sites"] == 4  # o_proj + down_proj in 2 layers
    assert data["errors"] == {
        "decode_b1": {"lora": "RuntimeError: injected failure of decode_b1/lora (test)"}
    }
    times = data["times"]
    assert set(times) == {"prefill", "train", "decode_b1", "decode_b2"}
    assert set(times["decode_b1"]) == {"base", "bem", "bem_merged"}  # the failure cost only itself
    assert set(times["prefill"]) == {"base", "lora", "bem", "bem_merged"}
    assert set(times["train"]) == {"base", "lora", "bem"}  # bem_merged trains as bem
    # The merged variant holds K merged copies of each site's base weight on top of bem's.
    weights_gb = data["model"]["weights_gb"]
    assert weights_gb["bem_merged"] > weights_gb["bem"]
    assert all(len(v) >= 1 for per in times.values() for v in per.values())
    ratios = data["summary"]["ratios"]
    assert ratios["lora_decode_ratio_vs_base_b1"] is None
    for key in (
        "inference_ratio_vs_base",
        "train_step_ratio",
        "decode_ratio_vs_base_b2",
        "merged_inference_ratio_vs_base",
        "merged_decode_ratio_vs_base_b1",
    ):
        assert ratios[key] > 0
    assert data["summary"]["mfu"]["prefill"]["bem"] > 0
    assert data["env"]["torch"] and data["env"]["transformers"] and data["env"]["peft"]
