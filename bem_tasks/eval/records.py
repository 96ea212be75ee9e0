"""Per-example score records: the unit the paired statistics resample.

One ``ExampleRecord`` is one system's scores on one held-out example under one seed. Records are
stored as JSONL (atomic write; every line validated on read, errors as ``file:line: field:
message``). ``paired_differences`` lines a candidate up against a baseline by
(example_id, seed) and returns an examples x seeds array of candidate - baseline, refusing to
guess when either side is missing a pair.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from bem_tasks.data.jsonl import DataFileError, read_jsonl, write_jsonl


@dataclass(frozen=True)
class ExampleRecord:
    example_id: str
    system: str
    seed: int
    metrics: dict[str, float]
    slices: tuple[str, ...] = field(default=())


class _RecordRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    example_id: str
    system: str
    seed: int
    metrics: dict[str, float]
    slices: list[str] = []

    @field_validator("example_id", "system")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one metric is required")
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"metrics {bad} are not finite numbers")
        return v


def _row(r: ExampleRecord) -> _RecordRow:
    return _RecordRow(
        example_id=r.example_id,
        system=r.system,
        seed=r.seed,
        metrics=dict(r.metrics),
        slices=list(r.slices),
    )


def write_records(path: str | os.PathLike[str], records: Iterable[ExampleRecord]) -> Path:
    """Atomically write records as JSONL (validated first, so a bad record never lands)."""
    return write_jsonl(path, [_row(r) for r in records])


def read_records(path: str | os.PathLike[str]) -> list[ExampleRecord]:
    """Read and validate records; a repeated (example_id, system, seed) is an error."""
    rows = read_jsonl(path, _RecordRow)
    first: dict[tuple[str, str, int], int] = {}
    out = []
    for lineno, r in enumerate(rows, start=1):
        k = (r.example_id, r.system, r.seed)
        if k in first:
            raise DataFileError(path, lineno, f"duplicate record {k} (first on line {first[k]})")
        first[k] = lineno
        out.append(ExampleRecord(r.example_id, r.system, r.seed, dict(r.metrics), tuple(r.slices)))
    return out


@dataclass(frozen=True)
class PairedArray:
    """Aligned scores: row i is ``example_ids[i]``, column j is ``seeds[j]``."""

    example_ids: list[str]
    seeds: list[int]
    candidate: np.ndarray  # (n_examples, n_seeds)
    baseline: np.ndarray  # (n_examples, n_seeds)

    @property
    def diffs(self) -> np.ndarray:
        """candidate - baseline, shape (n_examples, n_seeds)."""
        return self.candidate - self.baseline


def _grid(
    records: Sequence[ExampleRecord], system: str, metric: str, slice_tag: str | None
) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for r in records:
        if r.system != system or (slice_tag is not None and slice_tag not in r.slices):
            continue
        if metric not in r.metrics:
            raise KeyError(
                f"record ({r.example_id}, {system}, seed {r.seed}) has no metric {metric!r}; "
                f"it has {sorted(r.metrics)}"
            )
        k = (r.example_id, r.seed)
        if k in out:
            raise ValueError(
                f"duplicate record for {system}: example {r.example_id}, seed {r.seed}"
            )
        out[k] = r.metrics[metric]
    return out


def _missing(a: set[tuple[str, int]], b: set[tuple[str, int]]) -> str:
    gone = sorted(a - b)
    shown = ", ".join(f"{e}@seed{s}" for e, s in gone[:5])
    return f"{len(gone)} (e.g. {shown})"


def paired_differences(
    records: Sequence[ExampleRecord],
    *,
    metric: str,
    candidate: str,
    baseline: str,
    slice_tag: str | None = None,
) -> PairedArray:
    """Align ``candidate`` and ``baseline`` scores for ``metric`` by (example_id, seed).

    ``slice_tag`` keeps only records carrying that tag. Both systems must cover exactly the same
    (example_id, seed) pairs, and every example must have every seed (a full grid), otherwise a
    ``ValueError`` lists what is missing. Rows are sorted by example_id, columns by seed.
    """
    cand = _grid(records, candidate, metric, slice_tag)
    base = _grid(records, baseline, metric, slice_tag)
    where = f" in slice {slice_tag!r}" if slice_tag is not None else ""
    if not cand or not base:
        empty = candidate if not cand else baseline
        raise ValueError(f"no records for system {empty!r}{where}")
    ck, bk = set(cand), set(base)
    if ck != bk:
        parts = []
        if bk - ck:
            parts.append(f"candidate {candidate!r} lacks {_missing(bk, ck)}")
        if ck - bk:
            parts.append(f"baseline {baseline!r} lacks {_missing(ck, bk)}")
        raise ValueError(f"unpaired records for {metric!r}{where}: " + "; ".join(parts))
    examples = sorted({e for e, _ in ck})
    seeds = sorted({s for _, s in ck})
    full = {(e, s) for e in examples for s in seeds}
    if full != ck:
        raise ValueError(
            f"records for {metric!r}{where} are not a full examples x seeds grid: "
            f"missing {_missing(full, ck)}"
        )
    c = np.array([[cand[(e, s)] for s in seeds] for e in examples], dtype=np.float64)
    b = np.array([[base[(e, s)] for s in seeds] for e in examples], dtype=np.float64)
    return PairedArray(example_ids=examples, seeds=seeds, candidate=c, baseline=b)
