"""Suite A: compositional retrieve -> reason -> formalize items with oracle plans.

Text format (kept short so a tiny byte-level LM trained from scratch on CPU can learn it)::

    prompt: k3=17;k9=4;k1=8|add k3 k9\\n
    target: R:17,4;C:21;F:{"answer":21}

The target is three segments, each one skill of the oracle plan:

* ``R:<values>;``  retrieve: the values of the question's keys, in argument order;
* ``C:<result>;``  reason: the operation's result (absent for ``copy``, whose plan is R -> F);
* ``F:<json>``     formalize: the canonical answer ``{"answer": ...}`` (compact JSON).

``plan`` holds ``{skill, start, end}`` character spans of ``target`` (end exclusive); the spans
tile the target in order, so every target character has exactly one skill (a per-token router
label). Horizon (plan length) is 3, or 2 for ``copy``.

Operations: ``add`` a+b, ``sub`` a-b (may be negative), ``max``, ``min`` of two distinct keys,
``copy`` of one key, and ``sort`` of two or three distinct keys (ascending list)::

    prompt: k3=17;k9=4;k1=8|sort k3 k9 k1\n
    target: R:17,4,8;C:[4,8,17];F:{"answer":[4,8,17]}

``answer`` is the result as canonical compact JSON (``-3``, ``[4,8,17]``); scoring parses it
(``bem_tasks.eval.metrics.answer_em_f1``), so a list answer has an element-level, order-aware
F1 that differs from its EM. The prompt ends with a newline; the model generates ``target`` after it (no
terminator is part of the target: the tokenizer's EOS marks the end).

Splits are disjoint by *content*, not by prompt text: ``content_key`` is the operation, the
argument values (as a multiset where the order does not matter, in order for ``sub``) and the
fact set (order-free), so a train item with its facts or arguments reordered can never be a test
item. ``item_space`` counts the distinct keys a config can produce, and generation refuses a
request the space cannot hold.

Suite B reuses these items with a changed output convention (``answer_field``) or a reversed
operation (``reverse``), signalled by a question suffix; see ``feedback_stream``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from bem_tasks.data.jsonl import read_jsonl, write_splits
from bem_tasks.data.splits import DEFAULT_FRACTIONS, fill_splits, split_sizes, stable_id

SALT = "compositional"
SKILLS = ("retrieve", "reason", "formalize")
OPS = ("add", "sub", "max", "min", "copy", "sort")
Op = Literal["add", "sub", "max", "min", "copy", "sort"]
Skill = Literal["retrieve", "reason", "formalize"]
MAX_HORIZON = 3
ORDERED_OPS = frozenset({"sub"})  # the result depends on the argument order
ARITY: dict[str, tuple[int, int]] = {op: (2, 2) for op in OPS} | {"copy": (1, 1), "sort": (2, 3)}
KEY_WORD = re.compile(r"k\d+")  # the shape of a fact key (k0..k{n_keys-1}) in a question

Answer = int | list[int]


def apply_op(op: str, values: Sequence[int], *, reverse: bool = False) -> Answer:
    """The gold result. ``reverse`` is Suite B's reversed-operation variant: ``sub`` becomes
    b-a, ``max``/``min`` swap and ``sort`` is descending; ``add`` and ``copy`` are unchanged."""
    if op == "copy":
        if len(values) != 1:
            raise ValueError(f"copy takes 1 value, got {len(values)}")
        return values[0]
    if op == "sort":
        if len(values) not in (2, 3):
            raise ValueError(f"sort takes 2 or 3 values, got {len(values)}")
        return sorted(values, reverse=reverse)
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


def answer_json(result: Answer | dict[str, Answer]) -> str:
    """The canonical answer text: compact JSON (``-3``, ``[4,8,17]``, ``{"answer":-3}``)."""
    return json.dumps(result, separators=(",", ":"))


def content_key(facts: Mapping[str, int], op: str, values: Sequence[int]) -> str:
    """What makes two items the same problem, whatever order the prompt lists things in: the
    operation, the argument values (sorted unless the operation is order-sensitive) and the
    fact set (sorted ``key=value`` pairs). Split regions and de-duplication use this key."""
    vals = list(values) if op in ORDERED_OPS else sorted(values)
    fact_set = ",".join(sorted(f"{k}={v}" for k, v in facts.items()))
    return f"{op}|{','.join(map(str, vals))}|{fact_set}"


def prompt_content_key(prompt: str) -> str:
    """``content_key`` read back from a rendered prompt (``k3=17;k9=4|add k3 k9[ suffix]\\n``),
    for rows that keep only the prompt (Suite C's benign rows). The argument words are the
    key-shaped words (``k<digits>``) after the operation; each must be a fact key, their count
    must fit the operation, and only words that are not key-shaped may follow (a variant suffix
    such as `` reversed``). ValueError if it is not such a prompt."""
    try:
        context, question = prompt.rstrip("\n").split("|", 1)
        facts = {k: int(v) for k, v in (pair.split("=") for pair in context.split(";"))}
        op, *words = question.split(" ")
    except ValueError:
        raise ValueError(f"{prompt!r} is not a compositional prompt") from None
    if op not in ARITY:
        raise ValueError(f"{prompt!r} is not a compositional prompt: unknown operation {op!r}")
    n_args = next((i for i, w in enumerate(words) if not KEY_WORD.fullmatch(w)), len(words))
    args, suffix = words[:n_args], words[n_args:]
    lo, hi = ARITY[op]
    unknown = [w for w in args if w not in facts] + [w for w in suffix if KEY_WORD.fullmatch(w)]
    if unknown or not lo <= len(args) <= hi:
        raise ValueError(
            f"{prompt!r} is not a compositional prompt: {op} takes {lo}..{hi} argument keys "
            f"from the facts {list(facts)}, got {args}"
            + (f" ({unknown} not among the facts or after the suffix)" if unknown else "")
        )
    return content_key(facts, op, [facts[a] for a in args])


def render_context(facts: Mapping[str, int]) -> str:
    return ";".join(f"{k}={v}" for k, v in facts.items())


def render_question(op: str, args: Sequence[str], suffix: str = "") -> str:
    return " ".join([op, *args]) + suffix


def render_prompt(facts: Mapping[str, int], question: str) -> str:
    return f"{render_context(facts)}|{question}\n"


def render_target(
    values: Sequence[int],
    result: Answer,
    *,
    answer_field: str = "answer",
    with_reason: bool = True,
) -> tuple[str, list[PlanStep]]:
    """The target text and its oracle plan (segment spans)."""
    segments: list[tuple[Skill, str]] = [("retrieve", "R:" + ",".join(map(str, values)) + ";")]
    if with_reason:
        segments.append(("reason", f"C:{answer_json(result)};"))
    segments.append(("formalize", "F:" + answer_json({answer_field: result})))
    plan: list[PlanStep] = []
    pos = 0
    for skill, text in segments:
        plan.append(PlanStep(skill=skill, start=pos, end=pos + len(text)))
        pos += len(text)
    return "".join(t for _, t in segments), plan


def extract_answer(text: str, answer_field: str = "answer") -> str | None:
    """The answer inside the last ``F:{...}`` segment of generated text, or None.

    Returns the value of ``answer_field`` as canonical compact JSON (``-3``, ``[4,8]``, and a
    string value quoted: ``"3"``, so it never equals the number 3) when the JSON after ``F:``
    parses to an object holding it (trailing text after the object is ignored); anything else
    is None, so a wrong output convention (e.g. ``{"result": N}`` when ``answer`` is expected)
    scores as wrong.
    """
    pos = text.rfind("F:")
    if pos < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[pos + 2 :])
    except ValueError:  # JSONDecodeError, or an integer literal past Python's digit limit
        return None
    if not isinstance(obj, dict) or answer_field not in obj:
        return None
    return json.dumps(obj[answer_field], separators=(",", ":"), ensure_ascii=False)


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
        """The content key (``content_key``) used for split assignment and disjointness."""
        return content_key(self.facts, self.op, self.values)

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
        lo, hi = ARITY[op]
        if not lo <= len(v) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ValueError(f"{op} takes {want} argument(s), got {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"arguments {v} repeat a key; they must be distinct")
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
            want = answer_json(apply_op(op, [facts[a] for a in args], reverse=reverse))
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
                [facts[a] for a in args],
                json.loads(answer),
                answer_field=field,
                with_reason=op != "copy",
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
        answer=answer_json(result),
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
    lo, hi = ARITY[op]
    args = rng.sample(keys, rng.randint(lo, min(hi, n)))
    return facts, op, args


def question_key(question: tuple[dict[str, int], str, list[str]]) -> str:
    """``content_key`` of a drawn (facts, op, args), before the item is built."""
    facts, op, args = question
    return content_key(facts, op, [facts[a] for a in args])


def _partitions(n: int, largest: int) -> Iterator[tuple[int, ...]]:
    """The integer partitions of ``n`` with parts <= ``largest``, parts non-increasing."""
    if n == 0:
        yield ()
        return
    for first in range(min(n, largest), 0, -1):
        for rest in _partitions(n - first, first):
            yield (first, *rest)


def _selections(multiplicities: Sequence[int], size: int, *, ordered: bool) -> int:
    """Distinct ``size``-element selections (sequences if ``ordered``, else sub-multisets) of a
    multiset whose distinct elements repeat ``multiplicities`` times: a coefficient of the
    product of per-element (exponential, if ordered) generating polynomials."""
    poly = [1.0]
    for m in multiplicities:
        term = [1.0 / math.factorial(j) if ordered else 1.0 for j in range(m + 1)]
        prod = [0.0] * (len(poly) + m)
        for i, a in enumerate(poly):
            for j, b in enumerate(term):
                prod[i + j] += a * b
        poly = prod
    if size >= len(poly):
        return 0
    return round(poly[size] * (math.factorial(size) if ordered else 1))


def item_space(cfg: CompositionalConfig) -> int:
    """How many content-distinct items (distinct ``content_key``) ``cfg`` can produce.

    Counted exactly by the pattern of repeated values in a fact set: for ``n`` facts, a
    pattern with distinct values repeating ``m_1..m_k`` times occurs in
    ``V!/(V-k)! / prod(#equal m's)! * n!/prod(m_i!)`` value tuples (V values), each giving the
    same number of distinct questions per operation.
    """
    n_values = cfg.value_max - cfg.value_min + 1
    total = 0
    for n in range(cfg.min_facts, cfg.max_facts + 1):
        per_key_set = 0
        for parts in _partitions(n, n):
            k = len(parts)
            if k > n_values:
                continue
            tuples = math.perm(n_values, k) // math.prod(
                math.factorial(c) for c in Counter(parts).values()
            )
            tuples = tuples * math.factorial(n) // math.prod(math.factorial(m) for m in parts)
            questions = sum(
                _selections(parts, size, ordered=op in ORDERED_OPS)
                for op in cfg.ops
                for size in range(ARITY[op][0], ARITY[op][1] + 1)
            )
            per_key_set += tuples * questions
        total += math.comb(cfg.n_keys, n) * per_key_set
    return total


def check_item_space(
    cfg: CompositionalConfig,
    sizes: Mapping[str, int],
) -> int:
    """Check one necessary condition and return the item space's size: each requested split
    size is at most the number of content-distinct items whose hash falls in that split's
    region, estimated as ``item_space(cfg) * fraction``. ValueError naming the split otherwise,
    or for a split name that has no fraction.

    It does not count keys already used elsewhere (``make_compositional``'s ``seen``), and the
    sampler draws fact sets and questions, not items uniformly, so some items are much rarer
    than others: a request under this bound can still be unfillable or slow to fill, which the
    bounded draws of ``make_compositional`` turn into an error naming the sizes."""
    unknown = sorted(set(sizes) - set(DEFAULT_FRACTIONS))
    if unknown:
        raise ValueError(
            f"unknown split name(s) {unknown}; expected some of {list(DEFAULT_FRACTIONS)}"
        )
    space = item_space(cfg)
    for name, n in sizes.items():
        room = space * DEFAULT_FRACTIONS[name]
        if n > room:
            raise ValueError(
                f"n_{name}={n} asks for more items than the compositional item space holds: "
                f"{_describe(cfg, space)}, about {room:.0f} of them in the {name} region "
                f"({DEFAULT_FRACTIONS[name]:.0%}); ask for fewer or widen the item space"
            )
    return space


def _describe(cfg: CompositionalConfig, space: int) -> str:
    return (
        f"{space} content-distinct items (n_keys={cfg.n_keys}, facts "
        f"{cfg.min_facts}..{cfg.max_facts}, values {cfg.value_min}..{cfg.value_max}, "
        f"ops {list(cfg.ops)})"
    )


# Draws allowed per item at its region's rate (n / fraction draws fill a split when nothing is
# rejected as a repeat): enough for requests well inside the space, and a bound on the time a
# request close to it (or to `seen`) can spend before it fails.
DRAWS_PER_ITEM = 20


def make_compositional(
    *,
    seed: int,
    sizes: Mapping[str, int],
    config: CompositionalConfig | None = None,
    seen: set[str] | None = None,
    id_prefix: str = "A",
) -> dict[str, list[CompositionalItem]]:
    """In-memory Suite A splits (``sizes`` maps train/dev/test to counts), content-distinct and
    each in its content key's hash region. ValueError when the space cannot hold the request
    (``check_item_space``) or the bounded draws do not fill it."""
    cfg = config or CompositionalConfig()
    space = check_item_space(cfg, sizes)
    rng = random.Random(seed)
    expected = sum(n / DEFAULT_FRACTIONS[name] for name, n in sizes.items())
    max_tries = math.ceil(DRAWS_PER_ITEM * expected) + 10_000
    taken = len(seen or ())
    # Draw bare questions and build (validated) items only for the ones kept: most draws of a
    # large split are rejected, and the key needs no item.
    try:
        raw = fill_splits(
            lambda: sample_question(rng, cfg),
            question_key,
            sizes,
            salt=SALT,
            seen=seen,
            max_tries=max_tries,
        )
    except ValueError as e:
        raise ValueError(
            f"{e} (space: {_describe(cfg, space)}; the sampler is not uniform over it, and "
            f"{taken} keys were taken before this request)"
        ) from None
    return {
        name: [make_item(*q, split=name, id_prefix=id_prefix) for q in questions]
        for name, questions in raw.items()
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
