"""Latency measurement with warm-up and percentiles (p50/p95/p99 in milliseconds).

CUDA kernels run asynchronously, so timing a GPU call without a device synchronisation measures
only the launch. ``measure_latency`` and ``LatencyProfiler`` synchronise before starting and
before stopping the clock when the work runs on a CUDA device. torch is imported lazily, only
when a CUDA device is named (or torch is already loaded), so CPU-only callers never pay for it.

Percentiles are ``numpy.percentile`` with its default linear interpolation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Clock = Callable[[], float]  # seconds, monotonic


@dataclass(frozen=True)
class LatencyStats:
    n: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def summarize_latencies(samples_ms: Sequence[float]) -> LatencyStats:
    """Percentile summary of per-call latencies given in milliseconds."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("need a non-empty 1-D sequence of latencies")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("latencies must be finite and >= 0")
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return LatencyStats(
        n=int(arr.size),
        mean_ms=float(arr.mean()),
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        min_ms=float(arr.min()),
        max_ms=float(arr.max()),
    )


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    kind = getattr(device, "type", None)
    if isinstance(kind, str):
        return kind == "cuda"
    return str(device).startswith("cuda")


def cuda_sync_fn(device: Any = None, sync_cuda: bool | None = None) -> Callable[[], None] | None:
    """The synchronisation to run around each timed call, or None.

    ``sync_cuda=None`` (auto): synchronise iff CUDA is available and either ``device`` is a CUDA
    device, or no device is given and torch is already imported with CUDA initialised (work may
    be in flight). ``True`` forces it (error if CUDA is unavailable), ``False`` disables it.
    """
    if sync_cuda is False:
        return None
    if sync_cuda is None:
        if device is not None and not _is_cuda_device(device):
            return None
        if device is None and "torch" not in sys.modules:
            return None
    import torch  # lazy: only reached when CUDA may be in play

    if not torch.cuda.is_available():
        if sync_cuda:
            raise RuntimeError("sync_cuda=True but CUDA is not available")
        return None
    if device is None and sync_cuda is None and not torch.cuda.is_initialized():
        return None
    if _is_cuda_device(device):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return torch.cuda.synchronize


class LatencyProfiler:
    """Collects per-call latencies: ``with prof.measure(): step()``; then ``prof.stats()``.

    The first ``warmup`` measurements are discarded (compilation, allocator and cache warm-up).
    """

    def __init__(
        self,
        *,
        warmup: int = 0,
        device: Any = None,
        sync_cuda: bool | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.clock = clock
        self._sync = cuda_sync_fn(device, sync_cuda)
        self._seen = 0
        self.samples_ms: list[float] = []

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        start = self.clock()
        yield
        if self._sync is not None:
            self._sync()
        elapsed_ms = (self.clock() - start) * 1000.0
        self._seen += 1
        if self._seen > self.warmup:
            self.samples_ms.append(elapsed_ms)

    def stats(self) -> LatencyStats:
        if not self.samples_ms:
            raise ValueError(f"no measurements after {self.warmup} warm-up call(s)")
        return summarize_latencies(self.samples_ms)


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    iters: int = 20,
    device: Any = None,
    sync_cuda: bool | None = None,
    clock: Clock = time.perf_counter,
) -> LatencyStats:
    """Call ``fn()`` ``warmup`` times untimed, then ``iters`` times timed; return the summary."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    prof = LatencyProfiler(device=device, sync_cuda=sync_cuda, clock=clock)
    for _ in range(warmup):
        fn()
    for _ in range(iters):
        with prof.measure():
            fn()
    return prof.stats()
