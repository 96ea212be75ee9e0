"""Suite B: a feedback stream with a failure mode injected at prompt ``inject_at``.

The stream is a sequence of Suite A prompts, each with its gold feedback (target and answer).
From ``inject_at`` on, each prompt is, with probability ``variant_rate``, a *variant* task that
a model trained on the old convention gets wrong. The variant is signalled in the question by a
suffix, so the regular tasks keep their meaning and the held-out regular suite stays valid:

* ``result_key``  (suffix `` as result``): the answer is formatted ``{"result": N}`` instead of
  ``{"answer": N}``;
* ``reversed_op`` (suffix `` reversed``): ``sub`` means b-a, ``max``/``min`` swap and ``sort``
  is descending (only those operations are drawn, so the variant changes the meaning unless
  the values are equal).

Files: ``stream.jsonl`` (ordered by ``t``), ``probe.jsonl`` (held-out items of the injected
variant, for time_to_fix) and ``heldout.jsonl`` (held-out items of the regular mixture, for the
aggregate score). Stream prompts come from the training region of Suite A's hash split, probe
and held-out prompts from its test region, both by Suite A's content key (operation, argument
values, fact set; the variant is not part of it), and no content appears twice anywhere, so
neither the probes nor the held-out suite ever overlap the stream (or Suite A's training split),
not even with facts or arguments reordered or in another variant.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationInfo, field_validator

from bem_tasks.data.jsonl import read_jsonl, write_splits
from bem_tasks.data.splits import draw_in_region
from bem_tasks.data.suites.compositional import (
    OPS,
    SALT,
    CompositionalConfig,
    CompositionalItem,
    make_item,
    question_key,
    render_question,
    sample_question,
)

BASE = "base"


@dataclass(frozen=True)
class Variant:
    name: str
    suffix: str
    answer_field: str
    reverse: bool
    ops: tuple[str, ...]


VARIANTS: dict[str, Variant] = {
    "result_key": Variant("result_key", " as result", "result", False, OPS),
    "reversed_op": Variant(
        "reversed_op", " reversed", "answer", True, ("sub", "max", "min", "sort")
    ),
}


class StreamItem(CompositionalItem):
    """A Suite A item plus its stream position ``t`` (None for probe/held-out rows) and the
    variant name (``base`` for the regular mixture)."""

    t: int | None
    variant: str

    @property
    def injected(self) -> bool:
        return self.variant != BASE

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str, info: ValidationInfo) -> str:
        if v != BASE and v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected {BASE!r} or one of {list(VARIANTS)}")
        if not {"question", "answer_field", "reverse", "op", "args"} <= set(info.data):
            return v
        d = info.data
        bare = render_question(d["op"], d["args"])
        if v == BASE:
            ok = (d["answer_field"], d["reverse"]) == ("answer", False) and d["question"] == bare
        else:
            var = VARIANTS[v]
            ok = (
                (d["answer_field"], d["reverse"]) == (var.answer_field, var.reverse)
                and d["question"] == bare + var.suffix
                and d["op"] in var.ops
            )
        if not ok:
            raise ValueError(
                f"row does not follow variant {v!r} (answer_field, reverse, question suffix, op)"
            )
        return v


def _item(
    question: tuple[dict[str, int], str, list[str]], variant: Variant | None, split: str
) -> CompositionalItem:
    facts, op, args = question
    if variant is None:
        return make_item(facts, op, args, split=split, id_prefix="B")
    return make_item(
        facts,
        op,
        args,
        split=split,
        answer_field=variant.answer_field,
        reverse=variant.reverse,
        suffix=variant.suffix,
        id_prefix="B",
    )


def _stream_item(item: CompositionalItem, t: int | None, variant: str) -> StreamItem:
    return StreamItem(**item.model_dump(), t=t, variant=variant)


def make_feedback_stream(
    *,
    seed: int,
    n_stream: int,
    inject_at: int,
    variant: str = "result_key",
    variant_rate: float = 0.5,
    n_probe: int = 200,
    n_heldout: int = 200,
    config: CompositionalConfig | None = None,
) -> dict[str, list[StreamItem]]:
    """In-memory stream/probe/heldout lists (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    if not 0 <= inject_at < n_stream:
        raise ValueError(f"need 0 <= inject_at < n_stream, got {inject_at} and {n_stream}")
    if not 0.0 < variant_rate <= 1.0:
        raise ValueError(f"variant_rate must be in (0, 1], got {variant_rate}")
    if n_probe < 1 or n_heldout < 1:
        raise ValueError(f"n_probe and n_heldout must be >= 1, got {n_probe}, {n_heldout}")
    cfg = config or CompositionalConfig()
    var = VARIANTS[variant]
    if not any(o in var.ops for o in cfg.ops):
        raise ValueError(f"variant {variant!r} needs one of ops {var.ops}, config has {cfg.ops}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(v: Variant | None, region: str, split: str) -> CompositionalItem:
        # Questions are keyed before an item is built: most draws land outside the region.
        ops = None if v is None else [o for o in cfg.ops if o in v.ops]
        question = draw_in_region(
            lambda: sample_question(rng, cfg, ops), question_key, region, salt=SALT, seen=seen
        )
        return _item(question, v, split)

    stream: list[StreamItem] = []
    for t in range(n_stream):
        injected = t >= inject_at and rng.random() < variant_rate
        item = draw(var if injected else None, "train", "stream")
        stream.append(_stream_item(item, t, variant if injected else BASE))
    probe = [_stream_item(draw(var, "test", "probe"), None, variant) for _ in range(n_probe)]
    heldout = [_stream_item(draw(None, "test", "heldout"), None, BASE) for _ in range(n_heldout)]
    return {"stream": stream, "probe": probe, "heldout": heldout}


def generate_feedback_stream(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_stream: int = 2000,
    inject_at: int = 500,
    variant: str = "result_key",
    variant_rate: float = 0.5,
    n_probe: int = 200,
    n_heldout: int = 200,
    n_keys: int = 10,
    min_facts: int = 3,
    max_facts: int = 6,
    value_min: int = 0,
    value_max: int = 20,
    ops: Sequence[str] = OPS,
) -> dict[str, Path]:
    """Write ``stream.jsonl``, ``probe.jsonl``, ``heldout.jsonl`` under ``out_dir``."""
    cfg = CompositionalConfig(
        n_keys=n_keys,
        min_facts=min_facts,
        max_facts=max_facts,
        value_min=value_min,
        value_max=value_max,
        ops=tuple(ops),
    )
    parts = make_feedback_stream(
        seed=seed,
        n_stream=n_stream,
        inject_at=inject_at,
        variant=variant,
        variant_rate=variant_rate,
        n_probe=n_probe,
        n_heldout=n_heldout,
        config=cfg,
    )
    return write_splits(out_dir, parts)


def read_feedback_stream(path: str | os.PathLike[str]) -> list[StreamItem]:
    return read_jsonl(path, StreamItem)
