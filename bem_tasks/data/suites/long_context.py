"""Suite E: needle-in-a-haystack and multi-hop retrieval over long filler text.

A haystack is filler sentences drawn with a seeded RNG from ``FILLER`` until the context would
exceed ``length`` characters (= tokens for a byte-level tokenizer). Needles are inserted at the
sentence boundary closest to ``depth * filler_length`` (depth 0 = start, 1 = end):

* ``single``: needle "The code for k7 is 4821." and question "What is the code for k7?";
* ``multihop``: a link needle "k7 points to k2." at ``depth`` and a code needle "The code for
  k2 is 4821." at a second depth drawn from the configured depths; the question asks for the
  code of the key k7 points to.

Both kinds add ``n_distractors`` code needles for other keys at random depths, so copying any
4-digit number is not enough. The answer is the 4-digit code; prompt = context + "\\n" + question
+ "\\n" and target = answer.

Splits: items are split by a hash of their needle facts (e.g. ``single:k7=4821``), so no test
item shares a key->code fact with training. Train items use ``train_lengths``; dev and test use
``eval_lengths``; every (length, depth, kind) cell gets the same count per split.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from bem_tasks.data.jsonl import read_jsonl, write_splits
from bem_tasks.data.splits import draw_in_region, stable_id

SALT = "long_context"
Kind = Literal["single", "multihop"]
KINDS: tuple[str, ...] = ("single", "multihop")

FILLER: tuple[str, ...] = (
    "The river flows slowly past the old stone mill.",
    "A light rain fell over the quiet village all morning.",
    "Several birds gathered on the fence near the barn.",
    "The market opened early and the stalls filled with fruit.",
    "Clouds drifted across the hills toward the coast.",
    "An old clock ticked in the hallway of the house.",
    "The baker set fresh loaves on the wooden shelf.",
    "Children played a long game in the park after school.",
    "The train left the station a few minutes late.",
    "A cat slept in the sun beside the garden wall.",
    "The library was calm except for the turning of pages.",
    "Wind moved the tall grass in slow waves.",
    "The fisherman mended his nets on the pier.",
    "Lanterns were lit along the street at dusk.",
    "The teacher wrote a short poem on the board.",
    "A small boat crossed the lake before noon.",
    "The farmer counted the sheep in the upper field.",
    "Snow covered the mountain pass for most of the winter.",
    "The orchestra tuned their instruments before the concert.",
    "A narrow path led through the forest to the valley.",
    "The bakery smelled of cinnamon and warm bread.",
    "Old maps hung on the walls of the harbour office.",
    "The bridge was painted green many years ago.",
    "Bees moved from flower to flower in the meadow.",
)
CODE_RE = re.compile(r"The code for (k\d+) is (\d{4})\.")
LINK_RE = re.compile(r"(k\d+) points to (k\d+)\.")


def code_needle(key: str, code: int | str) -> str:
    return f"The code for {key} is {code}."


def link_needle(src: str, dst: str) -> str:
    return f"{src} points to {dst}."


def question_for(kind: str, key: str) -> str:
    if kind == "single":
        return f"What is the code for {key}?"
    return f"What is the code for the key that {key} points to?"


class Needle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["target", "link", "distractor"]
    text: str
    depth: float
    offset: int


class LongContextItem(BaseModel):
    """One Suite E row. Validation checks every needle sits at its offset, the prompt is built
    from context and question, and the answer follows from the needles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    split: str
    kind: Kind
    length: int
    depth: float
    query_key: str
    filler_length: int
    context: str
    needles: list[Needle]
    question: str
    prompt: str
    answer: str
    target: str

    @property
    def key(self) -> str:
        """The needle facts, so held-out items never share a key->code fact with training."""
        return needle_key(self.kind, self.needles)

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {v}")
        return v

    @field_validator("context")
    @classmethod
    def _context(cls, v: str, info: ValidationInfo) -> str:
        length = info.data.get("length")
        if length is not None and len(v) > length:
            raise ValueError(f"context has {len(v)} characters, more than length={length}")
        return v

    @field_validator("needles")
    @classmethod
    def _needles(cls, v: list[Needle], info: ValidationInfo) -> list[Needle]:
        context = info.data.get("context")
        if context is None:
            return v
        for i, n in enumerate(v):
            if context[n.offset : n.offset + len(n.text)] != n.text:
                raise ValueError(f"needle {i} ({n.text!r}) is not at offset {n.offset}")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        d = info.data
        if {"context", "question"} <= set(d) and v != f"{d['context']}\n{d['question']}\n":
            raise ValueError("expected context + '\\n' + question + '\\n'")
        return v

    @field_validator("answer")
    @classmethod
    def _answer(cls, v: str, info: ValidationInfo) -> str:
        d = info.data
        if not {"kind", "query_key", "needles", "question"} <= set(d):
            return v
        if d["question"] != question_for(d["kind"], d["query_key"]):
            raise ValueError(f"question should be {question_for(d['kind'], d['query_key'])!r}")
        want = resolve_answer(d["kind"], d["query_key"], d["needles"])
        if v != want:
            raise ValueError(f"expected {want!r} from the needles")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str, info: ValidationInfo) -> str:
        if "answer" in info.data and v != info.data["answer"]:
            raise ValueError("target must equal answer")
        return v


def resolve_answer(kind: str, query_key: str, needles: Sequence[Needle]) -> str:
    """Follow the needles: the code for ``query_key`` (single) or for the key it points to."""
    codes: dict[str, list[str]] = {}
    links: dict[str, list[str]] = {}
    for n in needles:
        if m := CODE_RE.fullmatch(n.text):
            codes.setdefault(m.group(1), []).append(m.group(2))
        elif m := LINK_RE.fullmatch(n.text):
            links.setdefault(m.group(1), []).append(m.group(2))
        else:
            raise ValueError(f"needle {n.text!r} is neither a code nor a link")
    key = query_key
    if kind == "multihop":
        if len(links.get(key, [])) != 1:
            raise ValueError(f"need exactly one link from {key}, found {links.get(key, [])}")
        key = links[key][0]
    if len(codes.get(key, [])) != 1:
        raise ValueError(f"need exactly one code for {key}, found {codes.get(key, [])}")
    return codes[key][0]


def needle_key(kind: str, needles: Sequence[Needle]) -> str:
    return _fact_key(kind, [n.text for n in needles if n.role != "distractor"])


def _fact_key(kind: str, texts: Iterable[str]) -> str:
    """The split key of an item: what it asks and its facts. The draw decides the split with it
    and check_disjoint checks the rows with it, so both must build it here."""
    # sorted: the key must not depend on the order the needles landed in the haystack
    return f"{kind}:" + "|".join(sorted(texts))


def filler_text(rng: random.Random, budget: int) -> list[str]:
    """Filler sentences whose ' '-joined length is at most ``budget``, as many as fit."""
    out: list[str] = []
    used = -1  # no separator before the first sentence
    while True:
        s = rng.choice(FILLER)
        if used + 1 + len(s) > budget:
            return out
        out.append(s)
        used += 1 + len(s)


def build_haystack(
    sentences: Sequence[str], needles: Sequence[tuple[str, str, float]]
) -> tuple[str, list[Needle]]:
    """Insert ``(role, text, depth)`` needles into the filler at the sentence boundary closest to
    ``depth * filler_length``; returns the context and the needles with their offsets."""
    starts = [0]
    for s in sentences:
        starts.append(starts[-1] + len(s) + 1)
    filler_len = max(starts[-1] - 1, 0)
    # boundary i = before sentence i (i = len(sentences): after the last one)
    bounds = [min(b, filler_len) for b in starts]
    slots: dict[int, list[tuple[str, str, float]]] = {}
    for role, text, depth in sorted(needles, key=lambda n: n[2]):
        i = min(range(len(bounds)), key=lambda j: (abs(bounds[j] - depth * filler_len), j))
        slots.setdefault(i, []).append((role, text, depth))
    pieces: list[str] = []
    placed: list[Needle] = []
    pos = 0
    for i in range(len(sentences) + 1):
        for role, text, depth in slots.get(i, []):
            placed.append(Needle(role=role, text=text, depth=depth, offset=pos))  # type: ignore[arg-type]
            pieces.append(text)
            pos += len(text) + 1
        if i < len(sentences):
            pieces.append(sentences[i])
            pos += len(sentences[i]) + 1
    return " ".join(pieces), placed


@dataclass(frozen=True)
class _Draw:
    kind: str
    query_key: str
    facts: tuple[tuple[str, str], ...]  # (role, text) of the non-distractor needles

    @property
    def key(self) -> str:
        return _fact_key(self.kind, (t for _, t in self.facts))


def _draw(rng: random.Random, kind: str, n_keys: int) -> _Draw:
    keys = [f"k{i}" for i in range(n_keys)]
    if kind == "single":
        k = rng.choice(keys)
        return _Draw(kind, k, (("target", code_needle(k, rng.randint(1000, 9999))),))
    src, dst = rng.sample(keys, 2)
    return _Draw(
        kind,
        src,
        (("link", link_needle(src, dst)), ("target", code_needle(dst, rng.randint(1000, 9999)))),
    )


def _build(
    rng: random.Random,
    d: _Draw,
    *,
    split: str,
    length: int,
    depth: float,
    depths: Sequence[float],
    n_keys: int,
    n_distractors: int,
) -> LongContextItem:
    used = {d.query_key} | {m.group(1) for _, t in d.facts if (m := CODE_RE.fullmatch(t))}
    free = [f"k{i}" for i in range(n_keys) if f"k{i}" not in used]
    distractors = [
        ("distractor", code_needle(k, rng.randint(1000, 9999)), rng.random())
        for k in rng.sample(free, n_distractors)
    ]
    needles = [(d.facts[0][0], d.facts[0][1], depth)]
    if len(d.facts) == 2:
        needles.append((d.facts[1][0], d.facts[1][1], rng.choice(list(depths))))
    needles += distractors
    budget = length - sum(len(t) + 1 for _, t, _ in needles)
    if budget < 1:
        raise ValueError(f"length {length} is too short for {len(needles)} needles")
    sentences = filler_text(rng, budget)
    context, placed = build_haystack(sentences, needles)
    question = question_for(d.kind, d.query_key)
    answer = resolve_answer(d.kind, d.query_key, placed)
    return LongContextItem(
        id=stable_id("E", f"{d.key}@{length}@{depth}", salt=SALT),
        split=split,
        kind=d.kind,  # type: ignore[arg-type]
        length=length,
        depth=depth,
        query_key=d.query_key,
        filler_length=len(" ".join(sentences)),
        context=context,
        needles=placed,
        question=question,
        prompt=f"{context}\n{question}\n",
        answer=answer,
        target=answer,
    )


def make_long_context(
    *,
    seed: int,
    train_lengths: Sequence[int] = (512, 1024),
    eval_lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    kinds: Sequence[str] = KINDS,
    n_train_per_cell: int = 20,
    n_dev_per_cell: int = 2,
    n_test_per_cell: int = 10,
    n_keys: int = 100,
    n_distractors: int = 2,
) -> dict[str, list[LongContextItem]]:
    """In-memory train/dev/test lists; see the module docstring."""
    if not depths or any(not 0.0 <= x <= 1.0 for x in depths):
        raise ValueError(f"depths must be a non-empty list in [0, 1], got {list(depths)}")
    bad_kinds = [k for k in kinds if k not in KINDS]
    if not kinds or bad_kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if n_keys < n_distractors + 3:
        raise ValueError(f"n_keys={n_keys} is too small for {n_distractors} distractors")
    rng = random.Random(seed)
    seen: set[str] = set()
    plan = [
        ("train", train_lengths, n_train_per_cell),
        ("dev", eval_lengths, n_dev_per_cell),
        ("test", eval_lengths, n_test_per_cell),
    ]
    out: dict[str, list[LongContextItem]] = {}
    for split, lengths, per_cell in plan:
        if per_cell < 1 or not lengths:
            raise ValueError(f"split {split!r} needs >= 1 item per cell and at least one length")
        rows: list[LongContextItem] = []
        for length, depth, kind in itertools.product(lengths, depths, kinds):
            for _ in range(per_cell):
                d = draw_in_region(
                    functools.partial(_draw, rng, kind, n_keys),
                    lambda x: x.key,
                    split,
                    salt=SALT,
                    seen=seen,
                )
                rows.append(
                    _build(
                        rng,
                        d,
                        split=split,
                        length=length,
                        depth=depth,
                        depths=depths,
                        n_keys=n_keys,
                        n_distractors=n_distractors,
                    )
                )
        out[split] = rows
    return out


def generate_long_context(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_lengths: Sequence[int] = (512, 1024),
    eval_lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    kinds: Sequence[str] = KINDS,
    n_train_per_cell: int = 20,
    n_dev_per_cell: int = 2,
    n_test_per_cell: int = 10,
    n_keys: int = 100,
    n_distractors: int = 2,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` under ``out_dir``."""
    splits = make_long_context(
        seed=seed,
        train_lengths=train_lengths,
        eval_lengths=eval_lengths,
        depths=depths,
        kinds=kinds,
        n_train_per_cell=n_train_per_cell,
        n_dev_per_cell=n_dev_per_cell,
        n_test_per_cell=n_test_per_cell,
        n_keys=n_keys,
        n_distractors=n_distractors,
    )
    return write_splits(out_dir, splits)


def read_long_context(path: str | os.PathLike[str]) -> list[LongContextItem]:
    return read_jsonl(path, LongContextItem)
