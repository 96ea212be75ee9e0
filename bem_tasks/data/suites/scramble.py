"""Suite D: a templated corpus with a checkable task, plus surface scramblers.

An item is a few space-tokenised sentences, each stating who did what to which object, and a
question about one of them::

    prompt: "bob painted the box . the cup was moved by carol . who moved the cup ?\\n"
    target: "carol moved the cup ."      (canonical answer sentence: BLEU/chrF on generation)
    answer: "carol"                      (accuracy: the entity)

Tokens are separated by single spaces and punctuation is its own token, so every scrambler is a
lossless token-level function. Scramblers are pure functions of ``(text, seed)``:

* ``relabel_tokens``: a seeded permutation (bijection) of the in-distribution word vocabulary;
  ``unrelabel_tokens`` inverts it. Words outside that vocabulary and punctuation pass through.
* ``shuffle_words``: shuffles the words inside each phrase (phrases end at ``.``, ``,``, ``?``).
* ``substitute_synonyms``: replaces each base verb/object with a synonym from the shipped table
  (``SYNONYMS``); the choice is a function of (seed, pool, word), so it is consistent in a text.
* ``rename_entities``: a seeded bijection from the training entities onto a pool of names.

Out-of-distribution surface forms are held out by construction: each synonym list is split into
a train half and an OOD half, the entity pool into train and OOD names, and the templates into
train and OOD templates. ``train``/``dev``/``test`` use only in-distribution forms (split by a
hash of the prompt); ``ood_synonym``, ``ood_entity`` and ``ood_template`` each swap in one kind of
unseen form, on prompts from the hash split's test region.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from bem_tasks.data.jsonl import read_jsonl, write_splits
from bem_tasks.data.splits import draw_in_region, fill_splits, split_sizes, stable_id

SALT = "scramble"

ENTITIES_TRAIN: tuple[str, ...] = (
    "alice", "bob", "carol", "dave", "erin", "frank",
    "grace", "heidi", "ivan", "judy", "mallory", "oscar",
)  # fmt: skip
ENTITIES_OOD: tuple[str, ...] = (
    "peggy", "quinn", "rupert", "sybil", "trent", "ursula",
    "victor", "wendy", "xavier", "yolanda", "zeke", "nora",
)  # fmt: skip

# Base word -> synonyms; the first half of each list is seen in training (scrambler pool
# "train"), the second half only in the ood_synonym split (pool "ood").
SYNONYMS: dict[str, tuple[str, ...]] = {
    # verbs (regular past tense, so passive templates stay grammatical)
    "moved": ("shifted", "relocated", "displaced", "transferred"),
    "cleaned": ("washed", "scrubbed", "rinsed", "wiped"),
    "fixed": ("repaired", "mended", "restored", "patched"),
    "painted": ("colored", "tinted", "stained", "coated"),
    "opened": ("unlocked", "unsealed", "unlatched", "uncovered"),
    "lifted": ("raised", "hoisted", "elevated", "boosted"),
    "pushed": ("shoved", "nudged", "pressed", "propelled"),
    "carried": ("hauled", "toted", "lugged", "ferried"),
    "dropped": ("released", "dumped", "lowered", "unloaded"),
    "watched": ("observed", "viewed", "monitored", "eyed"),
    # objects
    "box": ("crate", "carton", "case", "chest"),
    "cup": ("mug", "beaker", "tumbler", "goblet"),
    "door": ("gate", "portal", "hatch", "doorway"),
    "lamp": ("lantern", "light", "torch", "beacon"),
    "chair": ("seat", "stool", "bench", "armchair"),
    "book": ("novel", "volume", "tome", "manual"),
    "car": ("auto", "vehicle", "sedan", "automobile"),
    "rope": ("cord", "line", "cable", "twine"),
    "table": ("desk", "counter", "workbench", "stand"),
    "bag": ("sack", "pouch", "satchel", "tote"),
}
VERBS: tuple[str, ...] = tuple(list(SYNONYMS)[:10])
OBJECTS: tuple[str, ...] = tuple(list(SYNONYMS)[10:])

TEMPLATES: tuple[str, ...] = (
    "{e} {v} the {o} .",
    "the {o} was {v} by {e} .",
    "yesterday {e} {v} the {o} .",
    "{e} carefully {v} the {o} .",
    # held out (OOD templates)
    "it was {e} who {v} the {o} .",
    "the {o} , {e} {v} it .",
)
TRAIN_TEMPLATES = (0, 1, 2, 3)
OOD_TEMPLATES = (4, 5)
QUESTION = "who {v} the {o} ?"
ANSWER_SENTENCE = "{e} {v} the {o} ."
PUNCT = frozenset({".", ",", "?"})

Surface = Literal["id", "ood_synonym", "ood_entity", "ood_template"]
Pool = Literal["train", "ood"]


def synonym_pool(word: str, pool: Pool) -> tuple[str, ...]:
    syns = SYNONYMS[word]
    half = len(syns) // 2
    return syns[:half] if pool == "train" else syns[half:]


def _template_words(ids: Sequence[int]) -> list[str]:
    words = []
    for i in ids:
        for tok in TEMPLATES[i].split(" "):
            if not tok.startswith("{") and tok not in PUNCT:
                words.append(tok)
    return words


def _id_vocab() -> tuple[str, ...]:
    """Every word an in-distribution text (scrambled by train pools or not) can contain."""
    words = set(_template_words(TRAIN_TEMPLATES))
    words |= {t for t in QUESTION.split(" ") if not t.startswith("{") and t not in PUNCT}
    words |= set(ENTITIES_TRAIN) | set(SYNONYMS)
    for w in SYNONYMS:
        words |= set(synonym_pool(w, "train"))
    return tuple(sorted(words))


ID_VOCAB = _id_vocab()


def _rng(*parts: object) -> random.Random:
    # str seeds go through SHA-512 in random.seed, so this is stable across runs and platforms.
    return random.Random("\x00".join(map(str, parts)))


def _tokens(text: str) -> list[str]:
    return text.split(" ")


def relabel_mapping(seed: int) -> dict[str, str]:
    """A seeded bijection of ``ID_VOCAB`` onto itself."""
    shuffled = list(ID_VOCAB)
    _rng("relabel", seed).shuffle(shuffled)
    return dict(zip(ID_VOCAB, shuffled, strict=True))


def relabel_tokens(text: str, seed: int) -> str:
    m = relabel_mapping(seed)
    return " ".join(m.get(t, t) for t in _tokens(text))


def unrelabel_tokens(text: str, seed: int) -> str:
    inv = {v: k for k, v in relabel_mapping(seed).items()}
    return " ".join(inv.get(t, t) for t in _tokens(text))


def shuffle_words(text: str, seed: int) -> str:
    """Shuffle the words within each phrase; punctuation tokens stay in place."""
    rng = _rng("shuffle", seed, text)
    out: list[str] = []
    phrase: list[str] = []
    for tok in _tokens(text):
        if tok in PUNCT:
            rng.shuffle(phrase)
            out += phrase + [tok]
            phrase = []
        else:
            phrase.append(tok)
    rng.shuffle(phrase)
    return " ".join(out + phrase)


def synonym_of(word: str, seed: int, pool: Pool = "train") -> str:
    if word not in SYNONYMS:
        return word
    return _rng("synonym", seed, pool, word).choice(synonym_pool(word, pool))


def substitute_synonyms(text: str, seed: int, pool: Pool = "train") -> str:
    return " ".join(synonym_of(t, seed, pool) for t in _tokens(text))


def entity_mapping(seed: int, pool: Pool = "train") -> dict[str, str]:
    """Seeded bijection from ``ENTITIES_TRAIN`` onto the pool. For the train pool it is a
    derangement (a cycle through a shuffled order), so every entity really changes name."""
    order = list(ENTITIES_TRAIN)
    _rng("entity", seed, pool).shuffle(order)
    if pool == "train":
        return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    names = list(ENTITIES_OOD)
    _rng("entity-ood", seed).shuffle(names)
    return dict(zip(order, names, strict=True))


def rename_entities(text: str, seed: int, pool: Pool = "train") -> str:
    m = entity_mapping(seed, pool)
    return " ".join(m.get(t, t) for t in _tokens(text))


SCRAMBLERS: dict[str, Callable[[str, int], str]] = {
    "relabel": relabel_tokens,
    "shuffle": shuffle_words,
    "synonym": substitute_synonyms,
    "entity": rename_entities,
}


class Fact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: str
    verb: str
    object: str


def render_prompt(facts: Sequence[Fact], templates: Sequence[int], asked: int) -> str:
    sentences = [
        TEMPLATES[t].format(e=f.entity, v=f.verb, o=f.object)
        for f, t in zip(facts, templates, strict=True)
    ]
    q = facts[asked]
    return " ".join([*sentences, QUESTION.format(v=q.verb, o=q.object)]) + "\n"


def render_target(fact: Fact) -> str:
    return ANSWER_SENTENCE.format(e=fact.entity, v=fact.verb, o=fact.object)


class ScrambleItem(BaseModel):
    """One Suite D row. ``facts`` are in the row's own surface form; ``scrambler`` and
    ``scramble_seed`` are set on rows made by ``scramble_item`` (unscrambled rows are checked
    against their rendering from facts and templates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    split: str
    surface: Surface
    templates: list[int]
    facts: list[Fact]
    asked: int
    prompt: str
    target: str
    answer: str
    scrambler: str | None = None
    scramble_seed: int | None = None

    @property
    def key(self) -> str:
        return self.prompt

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t < len(TEMPLATES)]
        if bad:
            raise ValueError(f"template ids {bad} not in 0..{len(TEMPLATES) - 1}")
        return v

    @field_validator("facts")
    @classmethod
    def _facts(cls, v: list[Fact], info: ValidationInfo) -> list[Fact]:
        if not v:
            raise ValueError("at least one fact is required")
        templates = info.data.get("templates")
        if templates is not None and len(templates) != len(v):
            raise ValueError(f"{len(v)} facts but {len(templates)} templates")
        return v

    @field_validator("asked")
    @classmethod
    def _asked(cls, v: int, info: ValidationInfo) -> int:
        facts = info.data.get("facts")
        if facts is not None and not 0 <= v < len(facts):
            raise ValueError(f"asked must index a fact (0..{len(facts) - 1}), got {v}")
        return v

    @field_validator("answer")
    @classmethod
    def _answer(cls, v: str, info: ValidationInfo) -> str:
        d = info.data
        if not {"facts", "asked", "prompt", "target"} <= set(d):
            return v
        if v != d["facts"][d["asked"]].entity:
            raise ValueError(f"expected the asked fact's entity {d['facts'][d['asked']].entity!r}")
        if v not in _tokens(d["prompt"].rstrip("\n")):
            raise ValueError(f"answer {v!r} does not occur in the prompt")
        return v

    @field_validator("scrambler")
    @classmethod
    def _scrambler(cls, v: str | None, info: ValidationInfo) -> str | None:
        d = info.data
        if v is not None:
            if v not in SCRAMBLERS:
                raise ValueError(f"unknown scrambler {v!r}; expected one of {list(SCRAMBLERS)}")
            return v
        if not {"facts", "templates", "asked", "prompt", "target"} <= set(d):
            return v
        want = render_prompt(d["facts"], d["templates"], d["asked"])
        if d["prompt"] != want:
            raise ValueError(f"unscrambled row: prompt should be {want!r}")
        if d["target"] != render_target(d["facts"][d["asked"]]):
            raise ValueError(
                f"unscrambled row: target should be {render_target(d['facts'][d['asked']])!r}"
            )
        return v


def scramble_item(item: ScrambleItem, scrambler: str, seed: int) -> ScrambleItem:
    """Apply a scrambler to an item consistently: word-level maps (relabel, synonym, entity)
    transform prompt, target, answer and facts alike, so the answer stays correct; ``shuffle``
    changes only the prompt (the answer and the target do not depend on word order)."""
    if scrambler not in SCRAMBLERS:
        raise ValueError(f"unknown scrambler {scrambler!r}; expected one of {list(SCRAMBLERS)}")
    fn = SCRAMBLERS[scrambler]
    prompt = fn(item.prompt.rstrip("\n"), seed) + "\n"
    if scrambler == "shuffle":
        target, answer, facts = item.target, item.answer, item.facts
    else:
        target, answer = fn(item.target, seed), fn(item.answer, seed)
        facts = [
            Fact(entity=fn(f.entity, seed), verb=fn(f.verb, seed), object=fn(f.object, seed))
            for f in item.facts
        ]
    return ScrambleItem(
        id=f"{item.id}~{scrambler}{seed}",
        split=item.split,
        surface=item.surface,
        templates=item.templates,
        facts=facts,
        asked=item.asked,
        prompt=prompt,
        target=target,
        answer=answer,
        scrambler=scrambler,
        scramble_seed=seed,
    )


def _sample(
    rng: random.Random,
    *,
    min_facts: int,
    max_facts: int,
    entities: Sequence[str],
    templates: Sequence[int],
    surface: Surface,
    split: str,
) -> ScrambleItem:
    n = rng.randint(min_facts, max_facts)
    facts = [
        Fact(entity=e, verb=v, object=o)
        for e, v, o in zip(
            rng.sample(list(entities), n), rng.sample(VERBS, n), rng.sample(OBJECTS, n), strict=True
        )
    ]
    tids = [rng.choice(list(templates)) for _ in range(n)]
    asked = rng.randrange(n)
    prompt = render_prompt(facts, tids, asked)
    return ScrambleItem(
        id=stable_id("D", prompt, salt=SALT),
        split=split,
        surface=surface,
        templates=tids,
        facts=facts,
        asked=asked,
        prompt=prompt,
        target=render_target(facts[asked]),
        answer=facts[asked].entity,
    )


def _with_ood_synonyms(item: ScrambleItem, seed: int) -> ScrambleItem:
    def sub(w: str) -> str:
        return synonym_of(w, seed, "ood")

    facts = [Fact(entity=f.entity, verb=sub(f.verb), object=sub(f.object)) for f in item.facts]
    prompt = render_prompt(facts, item.templates, item.asked)
    return item.model_copy(
        update={
            "id": stable_id("D", prompt, salt=SALT),
            "surface": "ood_synonym",
            "facts": facts,
            "prompt": prompt,
            "target": render_target(facts[item.asked]),
        }
    )


def make_scramble(
    *,
    seed: int,
    sizes: Mapping[str, int],
    n_ood: int = 200,
    min_facts: int = 2,
    max_facts: int = 3,
) -> dict[str, list[ScrambleItem]]:
    """In-memory ID splits (``sizes`` over train/dev/test) plus the three OOD splits."""
    if not 1 <= min_facts <= max_facts <= len(VERBS):
        raise ValueError(f"need 1 <= min_facts <= max_facts <= {len(VERBS)}")
    if n_ood < 1:
        raise ValueError(f"n_ood must be >= 1, got {n_ood}")
    rng = random.Random(seed)
    seen: set[str] = set()
    common = {"min_facts": min_facts, "max_facts": max_facts}

    def sampler(entities: Sequence[str], templates: Sequence[int]) -> Callable[[], ScrambleItem]:
        return lambda: _sample(
            rng, entities=entities, templates=templates, surface="id", split="", **common
        )

    id_splits = fill_splits(
        sampler(ENTITIES_TRAIN, TRAIN_TEMPLATES), lambda it: it.key, sizes, salt=SALT, seen=seen
    )
    out = {
        name: [it.model_copy(update={"split": name}) for it in rows]
        for name, rows in id_splits.items()
    }

    def held_out(
        make: Callable[[], ScrambleItem], split: str, surface: Surface
    ) -> list[ScrambleItem]:
        rows = []
        for _ in range(n_ood):
            it = draw_in_region(make, lambda x: x.key, "test", salt=SALT, seen=seen)
            rows.append(it.model_copy(update={"split": split, "surface": surface}))
        return rows

    syn_seed = rng.randrange(2**32)
    base = held_out(sampler(ENTITIES_TRAIN, TRAIN_TEMPLATES), "ood_synonym", "ood_synonym")
    out["ood_synonym"] = [_with_ood_synonyms(it, syn_seed) for it in base]
    out["ood_entity"] = held_out(sampler(ENTITIES_OOD, TRAIN_TEMPLATES), "ood_entity", "ood_entity")
    out["ood_template"] = held_out(
        sampler(ENTITIES_TRAIN, OOD_TEMPLATES), "ood_template", "ood_template"
    )
    return out


def generate_scramble(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    n_ood: int = 200,
    min_facts: int = 2,
    max_facts: int = 3,
) -> dict[str, Path]:
    """Write ``train``, ``dev``, ``test``, ``ood_synonym``, ``ood_entity``, ``ood_template``
    ``.jsonl`` files under ``out_dir``."""
    sizes = split_sizes(n_train, n_dev, n_test)
    splits = make_scramble(
        seed=seed, sizes=sizes, n_ood=n_ood, min_facts=min_facts, max_facts=max_facts
    )
    return write_splits(out_dir, splits)


def read_scramble(path: str | os.PathLike[str]) -> list[ScrambleItem]:
    return read_jsonl(path, ScrambleItem)
