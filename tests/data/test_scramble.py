from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.data import DataFileError, check_disjoint
from bem_tasks.data.suites.scramble import (
    ENTITIES_OOD,
    ENTITIES_TRAIN,
    ID_VOCAB,
    OOD_TEMPLATES,
    PUNCT,
    SCRAMBLERS,
    SYNONYMS,
    TEMPLATES,
    entity_mapping,
    generate_scramble,
    read_scramble,
    relabel_mapping,
    relabel_tokens,
    rename_entities,
    scramble_item,
    shuffle_words,
    substitute_synonyms,
    synonym_of,
    synonym_pool,
    unrelabel_tokens,
)

SIZES: dict[str, Any] = {"n_train": 150, "n_dev": 20, "n_test": 30, "n_ood": 25}
TEXT = "the chair was dropped by grace . yesterday erin pushed the book . who dropped the chair ?"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    paths = generate_scramble(tmp_path_factory.mktemp("d"), seed=0, **SIZES)
    return {name: read_scramble(p) for name, p in paths.items()}


def test_lexicon_words_are_unique() -> None:
    words = [*ENTITIES_TRAIN, *ENTITIES_OOD]
    for base, syns in SYNONYMS.items():
        words += [base, *syns]
    for t in TEMPLATES:
        words += [w for w in t.split(" ") if not w.startswith("{") and w not in PUNCT]
    lexical = [w for w in words if w not in {"the", "was", "by", "it", "who"}]
    assert [w for w, c in Counter(lexical).items() if c > 1] == []
    for base in SYNONYMS:
        assert not set(synonym_pool(base, "train")) & set(synonym_pool(base, "ood"))


def test_scramblers_are_deterministic_functions_of_text_and_seed() -> None:
    for fn in SCRAMBLERS.values():
        assert fn(TEXT, 7) == fn(TEXT, 7)
        assert fn(TEXT, 7) != TEXT
    assert relabel_tokens(TEXT, 1) != relabel_tokens(TEXT, 2)


def test_relabelling_is_an_invertible_bijection() -> None:
    m = relabel_mapping(5)
    assert sorted(m) == sorted(m.values()) == sorted(ID_VOCAB)
    assert unrelabel_tokens(relabel_tokens(TEXT, 5), 5) == TEXT
    assert relabel_tokens("? , .", 5) == "? , ."  # punctuation passes through


def test_shuffle_keeps_words_within_their_phrase() -> None:
    out = shuffle_words(TEXT, 3).split(" ")
    src = TEXT.split(" ")
    assert [i for i, t in enumerate(out) if t in PUNCT] == [
        i for i, t in enumerate(src) if t in PUNCT
    ]

    def phrases(toks: list[str]) -> list[Counter]:
        acc: list[Counter] = []
        cur: Counter = Counter()
        for t in toks:
            if t in PUNCT:
                acc.append(cur)
                cur = Counter()
            else:
                cur[t] += 1
        return acc

    assert phrases(out) == phrases(src)


def test_synonyms_and_entities_use_their_pools() -> None:
    sub = substitute_synonyms(TEXT, 4).split(" ")
    assert "dropped" not in sub and "chair" not in sub
    train_syns = {s for b in SYNONYMS for s in synonym_pool(b, "train")}
    ood_syns = {s for b in SYNONYMS for s in synonym_pool(b, "ood")}
    assert {w for w in sub if w in train_syns} and not {w for w in sub if w in ood_syns}
    ood = substitute_synonyms(TEXT, 4, "ood").split(" ")
    assert {w for w in ood if w in ood_syns} and not {w for w in ood if w in train_syns}
    m = entity_mapping(9)
    assert sorted(m.values()) == sorted(ENTITIES_TRAIN) and all(k != v for k, v in m.items())
    assert sorted(entity_mapping(9, "ood").values()) == sorted(ENTITIES_OOD)
    assert rename_entities("grace . erin", 9) == f"{m['grace']} . {m['erin']}"


def test_scrambled_items_keep_a_correct_answer(rows: dict[str, list]) -> None:
    for it in rows["test"][:10]:
        for name in SCRAMBLERS:
            s = scramble_item(it, name, 11)
            assert s.answer == s.facts[s.asked].entity and s.answer in s.prompt.split(" ")
            assert s.prompt.endswith("?\n") or name == "shuffle"
        r = scramble_item(it, "relabel", 11)
        assert unrelabel_tokens(r.prompt.rstrip("\n"), 11) == it.prompt.rstrip("\n")
        assert unrelabel_tokens(r.answer, 11) == it.answer


def test_splits_answers_and_ood_surface_forms(rows: dict[str, list]) -> None:
    check_disjoint(rows)
    ood_syns = {s for b in SYNONYMS for s in synonym_pool(b, "ood")}
    for split, items in rows.items():
        for it in items:
            toks = set(it.prompt.split())
            q = it.facts[it.asked]
            assert it.prompt.rstrip("\n").endswith(f"who {q.verb} the {q.object} ?")
            assert it.answer == q.entity and it.target == f"{q.entity} {q.verb} the {q.object} ."
            # the asked (verb, object) pair occurs in exactly one fact
            assert sum((f.verb, f.object) == (q.verb, q.object) for f in it.facts) == 1
            ood_template = any(t in OOD_TEMPLATES for t in it.templates)
            if split in ("train", "dev", "test"):
                assert toks <= set(ID_VOCAB) | PUNCT and not ood_template
            else:
                assert split == it.surface
            if split == "ood_synonym":
                assert toks & ood_syns
            if split == "ood_entity":
                assert {f.entity for f in it.facts} <= set(ENTITIES_OOD)
            if split == "ood_template":
                assert all(t in OOD_TEMPLATES for t in it.templates)


def test_determinism_and_validation(tmp_path: Path) -> None:
    a = generate_scramble(tmp_path / "a", seed=0, **SIZES)
    b = generate_scramble(tmp_path / "b", seed=0, **SIZES)
    assert sorted(a) == ["dev", "ood_entity", "ood_synonym", "ood_template", "test", "train"]
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    lines = a["train"].read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = "zeke"
    lines[2] = json.dumps(row)
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=r"train\.jsonl:3: answer: .*asked fact's entity"):
        read_scramble(bad)


def test_bijective_scramblers_invert_on_the_whole_corpus(rows: dict[str, list]) -> None:
    """Relabelling, entity renaming and (on ID rows, which hold base words only) synonym
    substitution, each undone by its inverse map, give every prompt and target back."""
    for seed in (0, 3):
        inv_entity = {v: k for k, v in entity_mapping(seed).items()}
        for split, items in rows.items():
            for it in items:
                for text in (it.prompt.rstrip("\n"), it.target):
                    assert unrelabel_tokens(relabel_tokens(text, seed), seed) == text
                    renamed = rename_entities(text, seed).split(" ")
                    assert " ".join(inv_entity.get(w, w) for w in renamed) == text
                    if split in ("train", "dev", "test"):
                        back = {synonym_of(b, seed): b for b in SYNONYMS}
                        subst = substitute_synonyms(text, seed).split(" ")
                        assert " ".join(back.get(w, w) for w in subst) == text
