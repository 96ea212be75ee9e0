"""Soak test: run an online learner for a wall-clock duration and report what a long run shows.

A mission supplies ``advance()``, which processes one chunk of prompts (updates, canaries, drift
checks, rollbacks) and says what happened in it. ``run_soak`` calls it until the duration is
spent, samples the process's *current* resident memory after every chunk, and reports the
steady state: rollbacks and canary failures per 1000 prompts after the warm-up share of the
prompts, and memory growth as the least-squares slope of RSS against prompts processed with its
confidence interval, of every sample and of the floor (the lowest RSS of each tenth of the
steady state). A leak is a floor slope whose interval lies above a minimum growth
(``leak_min_mib_per_1k_prompts``): a long soak narrows the interval until allocator noise of a
few bytes per prompt would otherwise be called one; memory that is freed again moves only the
plain slope. The samples stay bounded (adjacent chunks merge two by two, so a 24 h soak keeps
between ``max_samples`` and twice that, evenly spaced). Nothing here knows about models;
``mission_b.soak`` supplies the learner.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bem_tasks.io import atomic_write_json

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")

# Growth below this is not called a leak however narrow its interval: 0.05 MiB per 1000 prompts is
# about 50 bytes kept per prompt; at the smoke's ~23 prompts/s on 2 cores that is ~4 MiB an hour.
LEAK_MIN_MIB_PER_1K_PROMPTS = 0.05


@dataclass(frozen=True)
class SoakChunk:
    """What one ``advance()`` call did."""

    prompts: int
    rollbacks: int = 0
    canary_checks: int = 0
    canary_failures: int = 0


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``5m``, ``24h``, ``1d`` or ``1h30m``."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"duration {text!r}: expected a number with a unit s, m, h or d, e.g. 90s, 5m, 24h "
            "or 1h30m"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r}: must be longer than 0 seconds")
    return seconds


def current_rss_mib() -> float:
    """Resident set size of this process now (not the peak), in MiB, from /proc/self/statm."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        raise OSError(
            f"{statm} not found: reading the current RSS needs Linux procfs; the peak "
            "(getrusage) cannot show growth over a soak"
        )
    resident_pages = int(statm.read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_growth(
    prompts: Sequence[float],
    rss_mib: Sequence[float],
    confidence: float = 0.95,
    min_slope: float = 0.0,
) -> dict[str, Any]:
    """Least-squares slope of RSS (MiB) on prompts processed, in MiB per 1000 prompts, with its
    two-sided t interval and the p-value of slope = 0 (``scipy.stats.linregress``); ``leak`` when
    the interval lies above ``min_slope``.

    Fewer than 3 samples (no residual degree of freedom for an interval) or a single prompt
    count gives ``slope=None`` and the reason, never a made-up number.
    """
    from scipy import stats

    if len(prompts) != len(rss_mib):
        raise ValueError(f"{len(prompts)} prompt counts but {len(rss_mib)} RSS samples")
    n = len(prompts)
    out: dict[str, Any] = {"n_samples": n, "confidence": confidence, "min_slope": min_slope}
    if n < 3 or len(set(prompts)) < 2:
        reason = f"{n} samples with {len(set(prompts))} distinct prompt counts; need 3 and 2"
        return {
            **out, "slope_mib_per_1k_prompts": None, "ci_low": None, "ci_high": None,
            "p_value": None, "leak": None, "reason": reason,
        }  # fmt: skip
    if len(set(rss_mib)) == 1:  # an exact fit: no residual to test against, nothing grew
        return {
            **out, "slope_mib_per_1k_prompts": 0.0, "ci_low": 0.0, "ci_high": 0.0,
            "p_value": None, "intercept_mib": float(rss_mib[0]), "leak": False,
            "reason": "RSS constant",
        }  # fmt: skip
    fit = stats.linregress([p / 1000 for p in prompts], list(rss_mib))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 2)) * float(fit.stderr)
    slope = float(fit.slope)
    return {
        **out,
        "slope_mib_per_1k_prompts": slope,
        "ci_low": slope - half,
        "ci_high": slope + half,
        "p_value": float(fit.pvalue),
        "intercept_mib": float(fit.intercept),
        # A leak is growth the interval cannot explain away, above the minimum; a positive slope
        # whose interval reaches the minimum is reported but not called one.
        "leak": bool(slope - half > min_slope),
    }


@dataclass(frozen=True)
class Sample:
    """State after a chunk (the first sample is taken before any)."""

    elapsed_s: float
    prompts: int  # processed so far
    rss_mib: float
    rollbacks: int = 0  # in the chunks since the previous sample
    canary_checks: int = 0
    canary_failures: int = 0
    chunks: int = 1  # since the previous sample


def merged(earlier: Sample, later: Sample) -> Sample:
    """One sample for two adjacent ones: the state after the later, the counts of both."""
    return Sample(
        later.elapsed_s, later.prompts, later.rss_mib, earlier.rollbacks + later.rollbacks,
        earlier.canary_checks + later.canary_checks,
        earlier.canary_failures + later.canary_failures, earlier.chunks + later.chunks,
    )  # fmt: skip


def soak_summary(
    samples: Sequence[Sample],
    *,
    warmup_fraction: float,
    confidence: float = 0.95,
    leak_min_mib_per_1k_prompts: float = LEAK_MIN_MIB_PER_1K_PROMPTS,
) -> dict[str, Any]:
    """Totals, and the steady state: the chunks that start after ``warmup_fraction`` of all the
    prompts processed (allocator and caches settle during warm-up). ``samples[0]`` is the state
    before the first chunk."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if not samples:
        raise ValueError("no samples: a soak takes one before its first chunk")
    total = samples[-1].prompts
    start = warmup_fraction * total
    # Sample i closes the chunk that started at sample i-1's prompt count.
    chunks = [(prev, s) for prev, s in zip(samples, samples[1:], strict=False)]
    steady = [s for prev, s in chunks if prev.prompts >= start]
    steady_prompts = sum(s.prompts - prev.prompts for prev, s in chunks if prev.prompts >= start)
    rollbacks = sum(s.rollbacks for s in steady)
    first = max((i for i, s in enumerate(samples) if s.prompts <= start), default=0)
    fit = samples[first:]
    memory = memory_growth(
        [s.prompts for s in fit], [s.rss_mib for s in fit], confidence, leak_min_mib_per_1k_prompts
    )
    rss = [s.rss_mib for s in samples]
    floor_growth = memory_growth(*memory_floor(fit), confidence, leak_min_mib_per_1k_prompts)
    seconds = fit[-1].elapsed_s - fit[0].elapsed_s
    prompts_per_hour = 3600 * (fit[-1].prompts - fit[0].prompts) / seconds if seconds > 0 else None
    floor_slope = floor_growth["slope_mib_per_1k_prompts"]
    return {
        "elapsed_s": samples[-1].elapsed_s,
        "chunks": sum(s.chunks for s in samples[1:]),
        "prompts": total,
        "prompts_per_s": total / samples[-1].elapsed_s if samples[-1].elapsed_s > 0 else None,
        "rollbacks": sum(s.rollbacks for s in samples),
        "canary_checks": sum(s.canary_checks for s in samples),
        "canary_failures": sum(s.canary_failures for s in samples),
        "warmup_fraction": warmup_fraction,
        "steady_state": {
            "from_prompt": samples[first].prompts,
            "chunks": sum(s.chunks for s in steady),
            "prompts": steady_prompts,
            "rollbacks": rollbacks,
            "rollbacks_per_1k_prompts": 1000 * rollbacks / steady_prompts
            if steady_prompts
            else None,
            "canary_checks": sum(s.canary_checks for s in steady),
            "canary_failures": sum(s.canary_failures for s in steady),
        },
        "rss_mib": {"start": rss[0], "end": rss[-1], "peak_sampled": max(rss)},
        "memory_growth": memory,
        "memory_floor_growth": floor_growth,
        # the floor's slope at the steady state's pace, for reading against a day of serving
        "floor_growth_mib_per_hour": floor_slope * prompts_per_hour / 1000
        if floor_slope is not None and prompts_per_hour is not None
        else None,
        "leak_min_mib_per_1k_prompts": leak_min_mib_per_1k_prompts,
        # A leak raises the floor; a sawtooth of memory given back tilts only the plain fit.
        "leak": floor_growth["leak"],
    }


def memory_floor(samples: Sequence[Sample], blocks: int = 10) -> tuple[list[int], list[float]]:
    """(prompts, RSS) at the lowest RSS of each of up to ``blocks`` consecutive runs of >= 3
    samples. Memory that is freed again (a cache refilled and dropped each pass over the stream)
    gives RSS a sawtooth whose straight-line fit tilts up when a short soak ends on a rise; the
    floor rises only with memory that is never given back."""
    n = min(blocks, len(samples) // 3)
    if n < 1:
        return [], []
    size = len(samples) / n
    lows = [
        min(samples[int(i * size) : int((i + 1) * size)], key=lambda s: s.rss_mib) for i in range(n)
    ]
    return [s.prompts for s in lows], [s.rss_mib for s in lows]


def run_soak(
    advance: Callable[[], SoakChunk],
    *,
    duration_s: float,
    out_dir: Path,
    warmup_fraction: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    rss_mib: Callable[[], float] = current_rss_mib,
    report_every_s: float = 300.0,
    max_samples: int = 1000,
    leak_min_mib_per_1k_prompts: float = LEAK_MIN_MIB_PER_1K_PROMPTS,
) -> dict[str, Any]:
    """Call ``advance()`` until ``duration_s`` of ``clock`` has passed (at least once), sample RSS
    after every ``stride`` chunks, and write ``soak.json`` (also every ``report_every_s`` while
    running, so a long soak can be watched) and ``soak.png`` in ``out_dir``. Returns the report.

    ``stride`` starts at 1 and doubles whenever ``2 * max_samples`` samples are held, merging
    them two by two: the soak's own bookkeeping stays bounded (it would otherwise grow with the
    prompts, like the leak it looks for) and the samples stay evenly spaced for the fit."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if max_samples < 3:
        raise ValueError(f"max_samples must be >= 3 (a fit with an interval), got {max_samples}")
    if not leak_min_mib_per_1k_prompts >= 0:
        raise ValueError(
            f"leak_min_mib_per_1k_prompts must be >= 0 MiB per 1000 prompts, got "
            f"{leak_min_mib_per_1k_prompts}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = clock()
    samples = [Sample(0.0, 0, rss_mib(), chunks=0)]
    stride, pending = 1, Sample(0.0, 0, 0.0, chunks=0)
    last_report = t0
    while True:
        chunk = advance()
        if not isinstance(chunk, SoakChunk) or chunk.prompts < 1:
            raise ValueError(f"advance() must return a SoakChunk of >= 1 prompt, got {chunk!r}")
        now = clock()
        done = now - t0 >= duration_s
        pending = merged(
            pending,
            Sample(now - t0, pending.prompts + chunk.prompts, 0.0, chunk.rollbacks,
                   chunk.canary_checks, chunk.canary_failures),
        )  # fmt: skip
        if pending.chunks == stride or done:
            prompts = samples[-1].prompts + pending.prompts
            samples.append(replace(pending, prompts=prompts, rss_mib=rss_mib()))
            pending = Sample(0.0, 0, 0.0, chunks=0)
            if len(samples) - 1 == 2 * max_samples:
                pairs = zip(samples[1::2], samples[2::2], strict=True)
                samples = [samples[0], *(merged(a, b) for a, b in pairs)]
                stride *= 2
        if now - last_report >= report_every_s:
            last_report = now
            _write(out_dir, samples, warmup_fraction, duration_s, "running", stride,
                   leak_min_mib_per_1k_prompts)  # fmt: skip
        if done:
            break
    return _write(out_dir, samples, warmup_fraction, duration_s, "complete", stride,
                  leak_min_mib_per_1k_prompts)  # fmt: skip


def _write(
    out_dir: Path,
    samples: list[Sample],
    warmup_fraction: float,
    duration_s: float,
    status: str,
    stride: int,
    leak_min_mib_per_1k_prompts: float,
) -> dict[str, Any]:
    report = {
        "status": status,
        "duration_s": duration_s,
        **soak_summary(
            samples,
            warmup_fraction=warmup_fraction,
            leak_min_mib_per_1k_prompts=leak_min_mib_per_1k_prompts,
        ),
        "chunks_per_sample": stride,
        "samples": [asdict(s) for s in samples],
    }
    atomic_write_json(out_dir / "soak.json", report)
    m, f, steady = report["memory_growth"], report["memory_floor_growth"], report["steady_state"]
    log.info(
        "soak %s: %.0fs, %d prompts, steady-state rollbacks/1k=%s, RSS %.1f -> %.1f MiB, "
        "MiB/1k prompts: slope %s [%s, %s], floor %s [%s, %s], leak=%s",
        status, report["elapsed_s"], report["prompts"], steady["rollbacks_per_1k_prompts"],
        report["rss_mib"]["start"], report["rss_mib"]["end"],
        *(_g(d[k]) for d in (m, f) for k in ("slope_mib_per_1k_prompts", "ci_low", "ci_high")),
        report["leak"],
    )  # fmt: skip
    if status == "complete":
        _plot(out_dir / "soak.png", samples)
    return report


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _plot(path: Path, samples: list[Sample]) -> None:
    from bem_tasks.missions.common import plot_series

    rollbacks = canary = 0
    cum_rollbacks, cum_canary = [], []
    for s in samples:
        rollbacks += s.rollbacks
        canary += s.canary_failures
        cum_rollbacks.append((s.prompts, rollbacks))
        cum_canary.append((s.prompts, canary))
    plot_series(
        path,
        {
            "RSS (MiB)": [(s.prompts, s.rss_mib) for s in samples],
            "rollbacks (cumulative)": cum_rollbacks,
            "canary failures (cumulative)": cum_canary,
        },
        title="soak",
        xlabel="prompts processed",
    )
