"""Suite A: compositional retrieve -> reason -> formalize items with oracle plans.

Text format (kept short so a tiny byte-level LM trained from scratch on CPU can learn it)::

    prompt: k3=17;k9=4;k1=8|add k3 k9\\n
    target: R:17,4;C:21;F:{"answer":21}

The target is three segments, each one skill of the oracle plan:

* ``R:<values>;``  retrieve: the values of the question's keys, in argument order;
* ``C:<result>;``  reason: the operation's result (absent for ``copy``, whose plan is R -> F);
* ``F:<json>``     formalize: the canonical answer ``{"answer": N}`` (compact JSON).

``plan`` holds ``{skill, start, end}`` character spans of ``target`` (end exclusive); the spans
tile the target in order, so every target character has exactly one skill (a per-token router
label). Horizon (plan length) is 3, or 2 for ``copy``.

Operations: ``add`` a+b, ``sub`` a-b (may be negative), ``max``, ``min`` of two distinct keys, and
``copy`` of one key. The prompt ends with a newline; the model generates ``target`` after it (no
terminator is part of the target: the tokenizer's EOS marks the end).

Suite B reuses these items with a changed output convention (``answer_field``) or a reversed
operation (``reverse``), signalled by a question suffix; see ``feedback_stream``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from bem_tasks.data.jsonl import read_jsonl, write_splits
from bem_tasks.data.splits import fill_splits, split_sizes, stable_id

SALT = "compositional"
SKILLS = ("retrieve", "reason", "formalize")
OPS = ("add", "sub", "max", "min", "copy")
Op = Literal["add", "sub", "max", "min", "copy"]
Skill = Literal["retrieve", "reason", "formalize"]
MAX_HORIZON = 3


def apply_op(op: str, values: Sequence[int], *, reverse: bool = False) -> int:
    """The gold result. ``reverse`` is Suite B's reversed-operation variant: ``sub`` becomes
    b-a and ``max``/``min`` swap; ``add`` and ``copy`` are unchanged."""
    if op == "copy":
        if len(values) != 1:
            raise ValueError(f"copy takes 1 value, got {len(values)}")
        return values[0]
    if len(values) != 2:
        raise ValueError(f"{op} takes 2 values, got {len(values)}")
    a, b = values
    if op == "add":
        return a + b
    if op == "sub":
        return b - a if reverse else a - b
    if op == "max":
        return min(a, b) if reverse else max(a, b)
    if op == "min":
        return max(a, b) if reverse else min(a, b)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


class PlanStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    skill: Skill
    start: int
    end: int


def render_context(facts: Mapping[str, int]) -> str:
    return ";".join(f"{k}={v}" for k, v in facts.items())


def render_question(op: str, args: Sequence[str], suffix: str = "") -> str:
    return " ".join([op, *args]) + suffix


def render_prompt(facts: Mapping[str, int], question: str) -> str:
    return f"{render_context(facts)}|{question}\n"


def render_target(
    values: Sequence[int], result: int, *, answer_field: str = "answer", with_reason: bool = True
) -> tuple[str, list[PlanStep]]:
    """The target text and its oracle plan (segment spans)."""
    segments: list[tuple[Skill, str]] = [("retrieve", "R:" + ",".join(map(str, values)) + ";")]
    if with_reason:
        segments.append(("reason", f"C:{result};"))
    answer_json = json.dumps({answer_field: result}, separators=(",", ":"))
    segments.append(("formalize", "F:" + answer_json))
    plan: list[PlanStep] = []
    pos = 0
    for skill, text in segments:
        plan.append(PlanStep(skill=skill, start=pos, end=pos + len(text)))
        pos += len(text)
    return "".join(t for _, t in segments), plan


def extract_answer(text: str, answer_field: str = "answer") -> str | None:
    """The answer inside the last ``F:{...}`` segment of generated text, or None.

    Returns ``str(value)`` of ``answer_field`` when the JSON after ``F:`` parses to an object
    holding it (trailing text after the object is ignored); anything else is None, so a wrong
    output convention (e.g. ``{"result": N}`` when ``answer`` is expected) scores as wrong.
    """
    pos = text.rfind("F:")
    if pos < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[pos + 2 :])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or answer_field not in obj:
        return None
    value = obj[answer_field]
    return value if isinstance(value, str) else json.dumps(value)


def check_plan(plan: Sequence[PlanStep], target: str) -> None:
    """Raise ValueError unless ``plan`` tiles ``target`` in order with horizon <= 3."""
    if not plan:
        raise ValueError("plan is empty")
    if len(plan) > MAX_HORIZON:
        raise ValueError(f"plan has {len(plan)} segments, horizon must be <= {MAX_HORIZON}")
    pos = 0
    for i, step in enumerate(plan):
        if step.start != pos or step.end <= step.start:
            raise ValueError(
                f"segment {i} ({step.skill}) spans [{step.start}, {step.end}); expected a "
                f"non-empty span starting at {pos} (segments must tile the target in order)"
            )
        pos = step.end
    if pos != len(target):
        raise ValueError(f"plan ends at {pos} but the target has {len(target)} characters")
    skills = [s.skill for s in plan]
    order = [SKILLS.index(s) for s in skills]
    if order != sorted(order) or len(set(skills)) != len(skills):
        raise ValueError(f"skills {skills} are not in retrieve -> reason -> formalize order")


def skill_per_char(target: str, plan: Sequence[PlanStep]) -> list[int]:
    """Router labels: the index into ``SKILLS`` of the skill owning each target character
    (one label per byte for a byte-level tokenizer: targets are ASCII)."""
    check_plan(plan, target)
    labels: list[int] = []
    for step in plan:
        labels += [SKILLS.index(step.skill)] * (step.end - step.start)
    return labels


def _need(info: ValidationInfo, *names: str) -> list[Any] | None:
    """Earlier fields, or None if one failed validation (its own error is reported already)."""
    if any(n not in info.data for n in names):
        return None
    return [info.data[n] for n in names]


class CompositionalItem(BaseModel):
    """One Suite A row. Validation recomputes the answer, target and plan from the facts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    split: str
    facts: dict[str, int]
    op: Op
    args: list[str]
    answer_field: str = "answer"
    reverse: bool = False
    question: str
    prompt: str
    answer: str
    target: str
    plan: list[PlanStep]

    @property
    def key(self) -> str:
        """Canonical (context, question) key used for split assignment and disjointness."""
        return self.prompt

    @property
    def values(self) -> list[int]:
        return [self.facts[a] for a in self.args]

    @field_validator("facts")
    @classmethod
    def _facts(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("at least one fact is required")
        return v

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str], info: ValidationInfo) -> list[str]:
        got = _need(info, "facts", "op")
        if got is None:
            return v
        facts, op = got
        want = 1 if op == "copy" else 2
        if len(v) != want:
            raise ValueError(f"{op} takes {want} argument(s), got {len(v)}")
        missing = [a for a in v if a not in facts]
        if missing:
            raise ValueError(f"keys {missing} are not among the facts {list(facts)}")
        return v

    @field_validator("question")
    @classmethod
    def _question(cls, v: str, info: ValidationInfo) -> str:
        got = _need(info, "op", "args")
        if got is not None and not v.startswith(render_question(*got)):
            raise ValueError(f"expected the question to start with {render_question(*got)!r}")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        got = _need(info, "facts", "question")
        if got is not None and v != render_prompt(*got):
            raise ValueError(f"expected {render_prompt(*got)!r} (rendered from facts, question)")
        return v

    @field_validator("answer")
    @classmethod
    def _answer(cls, v: str, info: ValidationInfo) -> str:
        got = _need(info, "facts", "op", "args", "reverse")
        if got is not None:
            facts, op, args, reverse = got
            want = str(apply_op(op, [facts[a] for a in args], reverse=reverse))
            if v != want:
                raise ValueError(f"expected {want!r} ({op} of {args}, reverse={reverse})")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str, info: ValidationInfo) -> str:
        got = _need(info, "facts", "op", "args", "answer", "answer_field")
        if got is not None:
            facts, op, args, answer, field = got
            want, _ = render_target(
                [facts[a] for a in args], int(answer), answer_field=field, with_reason=op != "copy"
            )
            if v != want:
                raise ValueError(f"expected {want!r}")
        return v

    @field_validator("plan")
    @classmethod
    def _plan(cls, v: list[PlanStep], info: ValidationInfo) -> list[PlanStep]:
        got = _need(info, "target", "op")
        if got is not None:
            target, op = got
            check_plan(v, target)
            want = ["retrieve", "formalize"] if op == "copy" else list(SKILLS)
            if [s.skill for s in v] != want:
                raise ValueError(f"{op} needs plan skills {want}, got {[s.skill for s in v]}")
            segments = {s.skill: target[s.start : s.end] for s in v}
            for skill, head in (("retrieve", "R:"), ("reason", "C:"), ("formalize", "F:")):
                if skill in segments and not segments[skill].startswith(head):
                    raise ValueError(f"{skill} span {segments[skill]!r} must start with {head!r}")
        return v


def make_item(
    facts: Mapping[str, int],
    op: str,
    args: Sequence[str],
    *,
    split: str,
    answer_field: str = "answer",
    reverse: bool = False,
    suffix: str = "",
    id_prefix: str = "A",
) -> CompositionalItem:
    """Build (and validate) one item from its facts and question."""
    values = [facts[a] for a in args]
    result = apply_op(op, values, reverse=reverse)
    question = render_question(op, args, suffix)
    prompt = render_prompt(facts, question)
    target, plan = render_target(
        values, result, answer_field=answer_field, with_reason=op != "copy"
    )
    return CompositionalItem(
        id=stable_id(id_prefix, prompt, salt=SALT),
        split=split,
        facts=dict(facts),
        op=op,  # type: ignore[arg-type]
        args=list(args),
        answer_field=answer_field,
        reverse=reverse,
        question=question,
        prompt=prompt,
        answer=str(result),
        target=target,
        plan=plan,
    )


@dataclass(frozen=True)
class CompositionalConfig:
    """Item space: ``n_keys`` key names k0..k{n-1}, ``min_facts``..``max_facts`` facts per
    context, values in ``value_min``..``value_max``, questions drawn uniformly from ``ops``."""

    n_keys: int = 10
    min_facts: int = 3
    max_facts: int = 6
    value_min: int = 0
    value_max: int = 20
    ops: tuple[str, ...] = OPS

    def __post_init__(self) -> None:
        if not 2 <= self.min_facts <= self.max_facts <= self.n_keys:
            raise ValueError(
                f"need 2 <= min_facts <= max_facts <= n_keys, got min_facts={self.min_facts}, "
                f"max_facts={self.max_facts}, n_keys={self.n_keys}"
            )
        if self.value_max <= self.value_min:
            raise ValueError(f"need value_min < value_max, got {self.value_min}, {self.value_max}")
        bad = [o for o in self.ops if o not in OPS]
        if not self.ops or bad:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")


def sample_question(
    rng: random.Random, cfg: CompositionalConfig, ops: Sequence[str] | None = None
) -> tuple[dict[str, int], str, list[str]]:
    """Draw (facts, op, args) from ``rng``; ``ops`` narrows the operations (default cfg.ops)."""
    n = rng.randint(cfg.min_facts, cfg.max_facts)
    keys = rng.sample([f"k{i}" for i in range(cfg.n_keys)], n)
    facts = {k: rng.randint(cfg.value_min, cfg.value_max) for k in keys}
    op = rng.choice(list(ops if ops is not None else cfg.ops))
    args = [rng.choice(keys)] if op == "copy" else rng.sample(keys, 2)
    return facts, op, args


def make_compositional(
    *,
    seed: int,
    sizes: Mapping[str, int],
    config: CompositionalConfig | None = None,
    seen: set[str] | None = None,
    id_prefix: str = "A",
) -> dict[str, list[CompositionalItem]]:
    """In-memory Suite A splits (``sizes`` maps train/dev/test to counts)."""
    cfg = config or CompositionalConfig()
    rng = random.Random(seed)

    def sample() -> CompositionalItem:
        facts, op, args = sample_question(rng, cfg)
        return make_item(facts, op, args, split="", id_prefix=id_prefix)

    raw = fill_splits(sample, lambda it: it.key, sizes, salt=SALT, seen=seen)
    return {
        name: [it.model_copy(update={"split": name}) for it in items] for name, items in raw.items()
    }


def generate_compositional(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    n_keys: int = 10,
    min_facts: int = 3,
    max_facts: int = 6,
    value_min: int = 0,
    value_max: int = 20,
    ops: Sequence[str] = OPS,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` under ``out_dir``; returns the paths."""
    sizes = split_sizes(n_train, n_dev, n_test)
    cfg = CompositionalConfig(
        n_keys=n_keys,
        min_facts=min_facts,
        max_facts=max_facts,
        value_min=value_min,
        value_max=value_max,
        ops=tuple(ops),
    )
    splits = make_compositional(seed=seed, sizes=sizes, config=cfg)
    return write_splits(out_dir, splits)


def read_compositional(path: str | os.PathLike[str]) -> list[CompositionalItem]:
    return read_jsonl(path, CompositionalItem)
