from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bem_tasks.eval.latency import (
    LatencyProfiler,
    cuda_sync_fn,
    measure_latency,
    summarize_latencies,
)


def fake_clock(durations_ms: list[float]) -> Iterator[float]:
    """A clock that makes consecutive (start, stop) reads differ by the given durations."""
    times: list[float] = []
    t = 100.0
    for d in durations_ms:
        times += [t, t + d / 1000.0]
        t += d / 1000.0 + 1.0
    return iter(times)


def test_percentiles_from_injected_timings() -> None:
    durations = [10.0, 20.0, 30.0, 40.0, 50.0]
    ticks = fake_clock(durations)
    calls = []
    stats = measure_latency(
        lambda: calls.append(1), warmup=2, iters=5, sync_cuda=False, clock=lambda: next(ticks)
    )
    assert len(calls) == 7  # warm-up calls run but are not timed
    assert stats.n == 5
    assert stats.p50_ms == pytest.approx(30.0)
    assert stats.p95_ms == pytest.approx(48.0)  # linear interpolation: 40 + 0.8 * 10
    assert stats.p99_ms == pytest.approx(49.6)
    assert stats.mean_ms == pytest.approx(30.0)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((10.0, 50.0))


def test_profiler_discards_warmup_measurements() -> None:
    ticks = fake_clock([500.0, 1.0, 2.0, 3.0])
    prof = LatencyProfiler(warmup=1, sync_cuda=False, clock=lambda: next(ticks))
    for _ in range(4):
        with prof.measure():
            pass
    assert prof.samples_ms == pytest.approx([1.0, 2.0, 3.0])
    assert prof.stats().p50_ms == pytest.approx(2.0)


def test_summary_matches_numpy_and_rejects_bad_input() -> None:
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    s = summarize_latencies(xs)
    assert s.p95_ms == pytest.approx(float(np.percentile(xs, 95)))
    assert set(s.to_dict()) == {"n", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "min_ms", "max_ms"}
    with pytest.raises(ValueError):
        summarize_latencies([])
    with pytest.raises(ValueError):
        summarize_latencies([1.0, -2.0])
    with pytest.raises(ValueError, match="no measurements"):
        LatencyProfiler(warmup=3).stats()


def test_no_cuda_sync_for_cpu_work() -> None:
    assert cuda_sync_fn("cpu") is None
    assert cuda_sync_fn(None, sync_cuda=False) is None
    assert cuda_sync_fn("cuda:0", sync_cuda=False) is None
