"""Soak reporting: known answers with a fake learner, fake clock and fake RSS, then a real leak."""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from pathlib import Path

import pytest

from bem_tasks.missions.soak import (
    LEAK_MIN_MIB_PER_1K_PROMPTS,
    Sample,
    SoakChunk,
    current_rss_mib,
    memory_growth,
    parse_duration,
    run_soak,
    soak_summary,
)


class Ticks:
    """A clock that moves ``step`` seconds per read after the first."""

    def __init__(self, step: float) -> None:
        self.t, self.step = -step, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def chunks(items: list[SoakChunk]) -> Callable[[], SoakChunk]:
    it = iter(items)
    return lambda: next(it)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("24h", 86400), ("1h30m", 5400), ("1.5h", 5400), (" 2D ", 172800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5 minutes", "-5m", "5m junk", "0s"])
def test_parse_duration_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match=f"duration {text!r}"):
        parse_duration(text)


def test_memory_growth_known_slope_and_flat() -> None:
    prompts = [0, 1000, 2000, 3000, 4000, 5000]
    leaking = [100 + 2 * i + (0.1 if i % 2 else -0.1) for i in range(6)]  # +2 MiB / 1000 prompts
    grow = memory_growth(prompts, leaking)
    assert grow["slope_mib_per_1k_prompts"] == pytest.approx(2.0, abs=0.1)
    assert 0 < grow["ci_low"] < 2.0 < grow["ci_high"]
    assert grow["p_value"] < 1e-4 and grow["leak"] is True
    flat = memory_growth(prompts, [100.0, 100.2, 99.9, 100.1, 99.8, 100.0])
    assert flat["ci_low"] < 0 < flat["ci_high"]
    assert flat["p_value"] > 0.05 and flat["leak"] is False
    constant = memory_growth(prompts, [100.0] * 6)
    assert constant["slope_mib_per_1k_prompts"] == 0 and constant["leak"] is False
    assert (constant["ci_low"], constant["ci_high"], constant["p_value"]) == (0, 0, None)


def test_memory_growth_needs_three_samples() -> None:
    out = memory_growth([0, 10], [1.0, 2.0])
    assert out["slope_mib_per_1k_prompts"] is None and "need 3" in out["reason"]
    with pytest.raises(ValueError, match="3 prompt counts but 2 RSS samples"):
        memory_growth([0, 1, 2], [1.0, 2.0])


def test_rollbacks_count_only_after_warmup() -> None:
    # 10 chunks of 100 prompts; warm-up = first 20% = 200 prompts = the first two chunks.
    samples = [Sample(0.0, 0, 50.0)] + [
        Sample(float(i), 100 * i, 50.0, rollbacks=3 if i <= 2 else (1 if i == 7 else 0),
               canary_checks=1, canary_failures=1 if i in (1, 7) else 0)
        for i in range(1, 11)
    ]  # fmt: skip
    out = soak_summary(samples, warmup_fraction=0.2)
    steady = out["steady_state"]
    assert out["rollbacks"] == 7 and out["canary_failures"] == 2 and out["prompts"] == 1000
    assert steady["from_prompt"] == 200 and steady["chunks"] == 8 and steady["prompts"] == 800
    assert steady["rollbacks"] == 1
    assert steady["rollbacks_per_1k_prompts"] == pytest.approx(1.25)
    assert steady["canary_checks"] == 8 and steady["canary_failures"] == 1
    # the memory fit starts at the steady state's first sample: prompts 200 .. 1000
    assert out["memory_growth"]["n_samples"] == 9
    with pytest.raises(ValueError, match="warmup_fraction"):
        soak_summary(samples, warmup_fraction=1.0)


def test_run_soak_with_a_leaking_and_a_flat_fake(tmp_path: Path) -> None:
    rss = iter([200.0 + 0.5 * i for i in range(100)])  # 0.5 MiB per 50-prompt chunk: 10/1k
    leak = run_soak(
        lambda: SoakChunk(prompts=50, canary_checks=1),
        duration_s=30, out_dir=tmp_path / "leak", clock=Ticks(1.0), rss_mib=lambda: next(rss),
    )  # fmt: skip
    assert leak["status"] == "complete" and leak["chunks"] == 30 and leak["prompts"] == 1500
    assert leak["memory_growth"]["slope_mib_per_1k_prompts"] == pytest.approx(10.0)
    assert leak["memory_growth"]["ci_low"] > 0 and leak["memory_growth"]["leak"] is True
    assert leak["leak"] is True
    assert leak["steady_state"]["rollbacks_per_1k_prompts"] == 0
    on_disk = json.loads((tmp_path / "leak" / "soak.json").read_text())
    assert on_disk["prompts"] == 1500 and len(on_disk["samples"]) == 31
    assert (tmp_path / "leak" / "soak.png").stat().st_size > 0

    wobble = iter(
        [300.0 + (0.3 if i % 3 == 0 else -0.2 if i % 3 == 1 else 0.0) for i in range(100)]
    )
    flat = run_soak(
        chunks([SoakChunk(prompts=40, rollbacks=1 if i == 0 else 0) for i in range(20)]),
        duration_s=20, out_dir=tmp_path / "flat", clock=Ticks(1.0), rss_mib=lambda: next(wobble),
    )  # fmt: skip
    growth = flat["memory_growth"]
    assert growth["ci_low"] < 0 < growth["ci_high"] and growth["leak"] is False
    assert flat["leak"] is False
    # the one rollback happened in the first chunk, inside the warm-up
    assert flat["rollbacks"] == 1 and flat["steady_state"]["rollbacks"] == 0


def test_run_soak_runs_at_least_one_chunk_and_rejects_empty_chunks(tmp_path: Path) -> None:
    out = run_soak(lambda: SoakChunk(prompts=5), duration_s=0.001, out_dir=tmp_path,
                   clock=Ticks(10.0), rss_mib=lambda: 1.0)  # fmt: skip
    assert out["chunks"] == 1 and out["memory_growth"]["slope_mib_per_1k_prompts"] is None
    with pytest.raises(ValueError, match="SoakChunk of >= 1 prompt"):
        run_soak(lambda: SoakChunk(prompts=0), duration_s=5, out_dir=tmp_path, clock=Ticks(1.0),
                 rss_mib=lambda: 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        run_soak(lambda: SoakChunk(prompts=1), duration_s=0, out_dir=tmp_path)


def test_run_soak_writes_a_running_report_while_it_goes(tmp_path: Path) -> None:
    seen: list[str] = []

    def advance() -> SoakChunk:
        path = tmp_path / "soak.json"
        seen.append(json.loads(path.read_text())["status"] if path.exists() else "none")
        return SoakChunk(prompts=1)

    run_soak(advance, duration_s=10, out_dir=tmp_path, clock=Ticks(1.0), rss_mib=lambda: 1.0,
             report_every_s=3)  # fmt: skip
    assert seen[:3] == ["none"] * 3 and "running" in seen


def test_a_real_object_leak_shows_in_the_real_rss(tmp_path: Path) -> None:
    """1 MiB kept per 10-prompt chunk: ~100 MiB per 1000 prompts in the process's own RSS.

    The leak is an anonymous mmap, not a bytes object: malloc would hand back pages that earlier
    tests freed, which are already resident, and the slope came out at 76 in CI."""
    kept: list[mmap.mmap] = []

    def advance() -> SoakChunk:
        page = mmap.mmap(-1, 1 << 20)  # fresh pages from the kernel, never from the free pool
        page.write(b"\x01" * (1 << 20))  # written, so the pages are resident
        kept.append(page)
        return SoakChunk(prompts=10)

    out = run_soak(advance, duration_s=40, out_dir=tmp_path, clock=Ticks(1.0))
    assert current_rss_mib() > 0
    growth = out["memory_growth"]
    assert growth["leak"] is True and growth["ci_low"] > 0
    assert 80 < growth["slope_mib_per_1k_prompts"] < 120, growth
    assert out["leak"] is True  # kept memory raises the floor too
    assert out["rss_mib"]["end"] - out["rss_mib"]["start"] >= 35  # 40 MiB kept


def _sawtooth(floor_step: float) -> list[Sample]:
    """RSS that climbs 10 MiB per chunk for 3 chunks, then drops back: 200 chunks of 100 prompts,
    ending on a climb; the floor rises ``floor_step`` MiB per tooth (400 prompts)."""
    return [Sample(0.0, 0, 500.0)] + [
        Sample(float(i), 100 * i, 500.0 + floor_step * (i // 4) + 10.0 * (i % 4))
        for i in range(1, 200)
    ]


def test_a_sawtooth_of_freed_memory_is_not_a_leak_but_a_rising_floor_is() -> None:
    freed = soak_summary(_sawtooth(0.0), warmup_fraction=0.2)
    floor = freed["memory_floor_growth"]
    assert floor["slope_mib_per_1k_prompts"] == pytest.approx(0.0, abs=1e-9)
    assert freed["leak"] is False and floor["n_samples"] == 10
    leaking = soak_summary(_sawtooth(3.0), warmup_fraction=0.2)
    assert leaking["leak"] is True
    assert leaking["memory_floor_growth"]["slope_mib_per_1k_prompts"] == pytest.approx(
        7.5, rel=0.05
    )


def test_a_long_soak_keeps_bounded_evenly_spaced_samples_and_every_count(tmp_path: Path) -> None:
    """1000 chunks with max_samples=10: merged two by two until 10..20 samples are held, each
    of the same number of chunks, with every rollback and canary counted and the slope kept."""
    i = [0]  # chunks so far

    def advance() -> SoakChunk:
        i[0] += 1
        return SoakChunk(prompts=10, rollbacks=i[0] % 3 == 0, canary_checks=1,
                         canary_failures=i[0] % 5 == 0)  # fmt: skip

    out = run_soak(
        advance, duration_s=1000, out_dir=tmp_path, clock=Ticks(1.0), max_samples=10,
        rss_mib=lambda: 100.0 + 0.5 * i[0] / 100 + 0.01 * (i[0] % 7),  # 0.5 MiB per 1000 prompts
    )  # fmt: skip
    samples = out["samples"]
    assert 10 <= len(samples) - 1 < 20 and out["chunks_per_sample"] == 64
    assert [s["chunks"] for s in samples[1:-1]] == [64] * (len(samples) - 2)
    assert sum(s["chunks"] for s in samples) == out["chunks"] == 1000 and out["prompts"] == 10000
    assert sum(s["rollbacks"] for s in samples) == out["rollbacks"] == 333
    assert out["canary_checks"] == 1000 and out["canary_failures"] == 200
    assert [s["prompts"] for s in samples[1:-1]] == [640 * k for k in range(1, len(samples) - 1)]
    # RSS is read once per kept sample; the slope survives the thinning
    assert out["memory_growth"]["slope_mib_per_1k_prompts"] == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ValueError, match="max_samples must be >= 3"):
        run_soak(advance, duration_s=5, out_dir=tmp_path, max_samples=2)


def test_growth_below_the_minimum_is_reported_but_not_called_a_leak(tmp_path: Path) -> None:
    prompts = [1000 * k for k in range(50)]
    tiny = [500.0 + 0.01 * k + (0.001 if k % 2 else 0.0) for k in range(50)]  # 0.01 MiB / 1k
    strict = memory_growth(prompts, tiny)
    assert strict["ci_low"] > 0 and strict["leak"] is True  # significant, however small
    lenient = memory_growth(prompts, tiny, min_slope=0.05)
    assert lenient["slope_mib_per_1k_prompts"] == pytest.approx(0.01, rel=0.01)
    assert lenient["ci_low"] > 0 and lenient["leak"] is False and lenient["min_slope"] == 0.05

    rss = iter(tiny * 4)
    report = run_soak(lambda: SoakChunk(prompts=1000), duration_s=49, out_dir=tmp_path,
                      clock=Ticks(1.0), rss_mib=lambda: next(rss))  # fmt: skip
    assert report["leak_min_mib_per_1k_prompts"] == LEAK_MIN_MIB_PER_1K_PROMPTS == 0.05
    assert report["leak"] is False and report["memory_floor_growth"]["ci_low"] > 0
    # 0.01 MiB per 1000 prompts at 1000 prompts a second
    assert report["floor_growth_mib_per_hour"] == pytest.approx(36.0, rel=0.05)
    rss = iter(tiny * 4)
    strict_run = run_soak(lambda: SoakChunk(prompts=1000), duration_s=49, out_dir=tmp_path,
                          clock=Ticks(1.0), rss_mib=lambda: next(rss),
                          leak_min_mib_per_1k_prompts=0.0)  # fmt: skip
    assert strict_run["leak"] is True
    with pytest.raises(ValueError, match="leak_min_mib_per_1k_prompts must be >= 0"):
        run_soak(lambda: SoakChunk(prompts=1), duration_s=5, out_dir=tmp_path,
                 leak_min_mib_per_1k_prompts=-1.0)  # fmt: skip
