"""bench/long_context.py measures what streaming adds to memory at two lengths, each in a fresh
process: bounded for Mission E's streaming evaluation, growing with length for a negative
control that keeps every logit (so the measurement can see growth)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "long_context_bench", ROOT / "bench" / "long_context.py"
)
assert spec and spec.loader
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SHORT, LONG = 2048, 32768
SLACK_MB = 20.0  # the CPU allocator wanders by up to about 10 MB after warm-up, at any length


def _bounded(rows: list[dict]) -> bool:
    short, long = (r["stream_mb"] for r in rows)
    return bool(long <= 1.2 * short + SLACK_MB)


def test_streaming_memory_does_not_grow_with_length() -> None:
    rows = bench.run([SHORT, LONG], "smoke", "cpu", keep_logits=False)
    assert [round(r["length"], -3) for r in rows] == [2000, 33000]  # an item of about that length
    # the slots and at most window/chunk = 2 chunks of pending pairs, whatever the length:
    # (64 + 2 x 128) pairs x (32 + 32 + 1) floats x 4 B
    assert all(0 < r["memory_state_bytes"] <= (64 + 2 * 128) * 65 * 4 for r in rows), rows
    assert _bounded(rows), rows


def test_the_measurement_sees_growth_when_logits_are_kept() -> None:
    rows = bench.run([SHORT, LONG], "smoke", "cpu", keep_logits=True)
    assert not _bounded(rows), rows  # 30k more tokens x 260 logits x 4 B = about 31 MB more
