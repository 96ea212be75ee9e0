"""Deterministic synthetic suites (one per mission) and validating JSONL readers.

``SUITES[name]`` gives each suite's ``generate(out_dir, *, seed, ...) -> {split: Path}``, its
``read(path) -> list[Row]`` and its row model. The same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bem_tasks.data.jsonl import DataFileError, read_jsonl, write_jsonl
from bem_tasks.data.splits import check_disjoint, region_of
from bem_tasks.data.suites.compositional import (
    CompositionalItem,
    extract_answer,
    generate_compositional,
    read_compositional,
)
from bem_tasks.data.suites.feedback_stream import (
    StreamItem,
    generate_feedback_stream,
    read_feedback_stream,
)
from bem_tasks.data.suites.long_context import (
    LongContextItem,
    generate_long_context,
    read_long_context,
)
from bem_tasks.data.suites.safety import (
    SafetyItem,
    generate_safety,
    judge_over_refusal,
    judge_violation,
    read_safety,
)
from bem_tasks.data.suites.scramble import (
    ScrambleItem,
    generate_scramble,
    read_scramble,
    scramble_item,
)


@dataclass(frozen=True)
class Suite:
    name: str
    mission: str
    generate: Callable[..., dict[str, Path]]
    read: Callable[[str | os.PathLike[str]], list[Any]]
    row: type[BaseModel]


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("compositional", "A", generate_compositional, read_compositional, CompositionalItem),
        Suite("feedback_stream", "B", generate_feedback_stream, read_feedback_stream, StreamItem),
        Suite("safety", "C", generate_safety, read_safety, SafetyItem),
        Suite("scramble", "D", generate_scramble, read_scramble, ScrambleItem),
        Suite("long_context", "E", generate_long_context, read_long_context, LongContextItem),
    )
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}") from None


__all__ = [
    "SUITES",
    "CompositionalItem",
    "DataFileError",
    "LongContextItem",
    "SafetyItem",
    "ScrambleItem",
    "StreamItem",
    "Suite",
    "check_disjoint",
    "extract_answer",
    "generate_compositional",
    "generate_feedback_stream",
    "generate_long_context",
    "generate_safety",
    "generate_scramble",
    "get_suite",
    "judge_over_refusal",
    "judge_violation",
    "read_compositional",
    "read_feedback_stream",
    "read_jsonl",
    "read_long_context",
    "read_safety",
    "read_scramble",
    "region_of",
    "scramble_item",
    "write_jsonl",
]
