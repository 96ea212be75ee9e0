"""Suite A splits are disjoint by content: operation, argument values and fact set, whatever
order the prompt lists them in."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import yaml

from bem_tasks.cli import main
from bem_tasks.data import check_disjoint, region_of
from bem_tasks.data.jsonl import write_jsonl
from bem_tasks.data.splits import fill_splits
from bem_tasks.data.suites.compositional import (
    ARITY,
    OPS,
    SALT,
    CompositionalConfig,
    CompositionalItem,
    check_item_space,
    content_key,
    extract_answer,
    generate_compositional,
    item_space,
    make_compositional,
    make_item,
    prompt_content_key,
    question_key,
    read_compositional,
)
from bem_tasks.missions.mission_a_params import ALL_OPS

ROOT = Path(__file__).resolve().parents[2]


def same_problem(it: CompositionalItem) -> tuple:
    # an independent restatement of "the same problem", not a call into the generator
    values = [it.facts[a] for a in it.args]
    return (
        it.op,
        tuple(values) if it.op == "sub" else tuple(sorted(values)),
        frozenset(it.facts.items()),
    )


def reordered(it: CompositionalItem, split: str) -> CompositionalItem:
    """The same problem with its facts listed in reverse and (unless order matters) its
    arguments swapped: a different prompt string."""
    facts = dict(reversed(list(it.facts.items())))
    args = it.args if it.op == "sub" else list(reversed(it.args))
    return make_item(facts, it.op, args, split=split)


def smoke_data() -> dict:
    doc = yaml.safe_load((ROOT / "experiments" / "mission_a_agentic_planner.yml").read_text())
    return dict(doc["params"]["data"])


def config_of(d: dict) -> CompositionalConfig:
    names = ("n_keys", "min_facts", "max_facts", "value_min", "value_max")
    return CompositionalConfig(**{k: d[k] for k in names if k in d})


def test_the_key_ignores_order_but_not_content() -> None:
    it = make_item({"k3": 17, "k9": 4, "k1": 8}, "add", ["k3", "k9"], split="x")
    again = make_item({"k1": 8, "k9": 4, "k3": 17}, "add", ["k9", "k3"], split="x")
    assert it.prompt != again.prompt and it.key == again.key
    assert it.key == prompt_content_key(it.prompt) == prompt_content_key(again.prompt)
    sub = make_item({"k3": 17, "k9": 4}, "sub", ["k3", "k9"], split="x")
    flipped = make_item({"k3": 17, "k9": 4}, "sub", ["k9", "k3"], split="x")
    assert sub.key != flipped.key  # 13 vs -13: another problem
    srt = make_item({"k1": 8, "k3": 17, "k9": 4}, "sort", ["k1", "k3", "k9"], split="x")
    assert srt.key == make_item(srt.facts, "sort", ["k9", "k1", "k3"], split="x").key
    assert it.key != make_item({"k3": 17, "k9": 4, "k1": 9}, "add", ["k3", "k9"], split="x").key
    assert it.key != make_item(it.facts, "max", ["k3", "k9"], split="x").key
    with pytest.raises(ValueError, match="is not a compositional prompt"):
        prompt_content_key("What is the capital of France?\n")


def test_a_reordered_train_item_is_kept_out_of_test() -> None:
    cfg = config_of(smoke_data())
    seen: set[str] = set()
    splits = make_compositional(
        seed=0, sizes={"train": 300, "dev": 10, "test": 10}, config=cfg, seen=seen
    )
    # a train item whose reordered prompt string hashes to the test region: keyed by prompt
    # text (as before) it would have been a test item
    train = next(
        it for it in splits["train"] if region_of(reordered(it, "test").prompt, salt=SALT) == "test"
    )
    dup = reordered(train, "test")
    assert dup.prompt != train.prompt and same_problem(dup) == same_problem(train)
    # by content it lies in the train region, so no generator ever draws it for test ...
    assert region_of(dup.key, salt=SALT) == "train"
    q = (dup.facts, dup.op, dup.args)
    with pytest.raises(ValueError, match="could not fill splits"):
        fill_splits(lambda: q, question_key, {"test": 1}, salt=SALT, max_tries=50)
    # ... and once the train item is drawn, its reordered copy is a duplicate everywhere
    with pytest.raises(ValueError, match="could not fill splits"):
        fill_splits(lambda: q, question_key, {"train": 1}, salt=SALT, seen=seen, max_tries=50)
    with pytest.raises(ValueError, match=r"train:\d+ and test:1 share 'add|sub|max|min|copy|sort"):
        check_disjoint({"train": splits["train"], "test": [dup]})


def test_smoke_splits_share_no_content() -> None:
    d = smoke_data()
    for n_test in (d["n_test"], 3000):  # the experiment file's size, and a power-sized one
        sizes = {"train": d["n_train"], "dev": d["n_dev"], "test": n_test}
        splits = make_compositional(seed=d.get("seed", 0), sizes=sizes, config=config_of(d))
        assert {k: len(v) for k, v in splits.items()} == sizes
        owner: dict[tuple, str] = {}
        for name, items in splits.items():
            for it in items:
                assert owner.setdefault(same_problem(it), name) == name, it.prompt
        assert len(owner) == sum(sizes.values())  # no content repeats within a split either
        test = splits["test"]
        # the suite keeps the answers the old scoring got wrong, and list answers for F1
        assert sum(it.answer.startswith("-") for it in test) / len(test) > 0.05
        assert sum(it.op == "sort" for it in test) / len(test) > 0.05


def test_item_space_is_counted_exactly() -> None:
    cfg = CompositionalConfig(n_keys=4, min_facts=2, max_facts=3, value_min=0, value_max=2)
    keys = set()
    names = [f"k{i}" for i in range(cfg.n_keys)]
    for n in range(cfg.min_facts, cfg.max_facts + 1):
        for chosen in itertools.combinations(names, n):
            for values in itertools.product(range(cfg.value_min, cfg.value_max + 1), repeat=n):
                facts = dict(zip(chosen, values, strict=True))
                for op in OPS:
                    for r in range(ARITY[op][0], min(ARITY[op][1], n) + 1):
                        for args in itertools.permutations(chosen, r):
                            keys.add(same_problem(make_item(facts, op, args, split="")))
    assert item_space(cfg) == len(keys)
    sub_only = CompositionalConfig(n_keys=2, min_facts=2, max_facts=2, value_max=1, ops=("sub",))
    # k0, k1 in 0..1: two fact sets with distinct values (2 orders each), two with equal (1)
    assert item_space(sub_only) == 2 * 2 + 2 * 1


def test_too_large_a_request_is_a_clear_error(tmp_path: Path) -> None:
    small = {"n_keys": 3, "min_facts": 2, "max_facts": 2, "value_min": 0, "value_max": 2}
    space = item_space(CompositionalConfig(**small))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"n_test=500 asks for more .* holds: {space} content"):
        generate_compositional(tmp_path, n_train=10, n_dev=5, n_test=500, **small)  # type: ignore[arg-type]
    # a request the space can hold is filled, content-distinct
    n_test = int(space * 0.1 * 0.8)
    out = generate_compositional(tmp_path, n_train=10, n_dev=5, n_test=n_test, **small)  # type: ignore[arg-type]
    check_disjoint({s: read_compositional(p) for s, p in out.items()})


def test_params_ops_follow_the_suite() -> None:
    assert tuple(ALL_OPS) == OPS


def test_data_validate_names_both_sides_of_a_content_overlap(tmp_path: Path, capsys) -> None:
    paths = generate_compositional(tmp_path / "d", seed=0, n_train=40, n_dev=5, n_test=5)
    train = read_compositional(paths["train"])
    test = read_compositional(paths["test"])
    i = 6
    dup = reordered(train[i], "test")
    assert dup.prompt != train[i].prompt
    write_jsonl(paths["test"], [*test[:2], dup, *test[2:]])  # a valid row, line 3
    args = ["data", "validate", str(paths["train"]), str(paths["test"]), "--suite", "compositional"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"OVERLAP  {paths['test']}:3 has the content of {paths['train']}:{i + 1}: " in err
    assert train[i].key in err and "splits overlap: 1 row(s)" in err
    # within one file too
    write_jsonl(paths["dev"], [*read_compositional(paths["dev"]), reordered(train[0], "dev")])
    write_jsonl(paths["train"], [*train, reordered(train[0], "train")])
    assert main(["data", "validate", str(paths["train"]), "--mission", "mission_a"]) == 2
    assert f"{paths['train']}:41 has the content of {paths['train']}:1" in capsys.readouterr().err
    # and clean files pass
    clean = generate_compositional(tmp_path / "c", seed=0, n_train=40, n_dev=5, n_test=5)
    assert main(["data", "validate", *map(str, clean.values()), "--mission", "mission_a"]) == 0
    assert "OK  3 files share no example by content" in capsys.readouterr().out


def test_random_reorderings_never_cross_regions() -> None:
    rng = random.Random(0)
    cfg = config_of(smoke_data())
    items = make_compositional(seed=1, sizes={"train": 200, "dev": 20, "test": 20}, config=cfg)
    for name, rows in items.items():
        for it in rows:
            keys = list(it.facts)
            rng.shuffle(keys)
            args = it.args if it.op == "sub" else rng.sample(it.args, len(it.args))
            moved = make_item({k: it.facts[k] for k in keys}, it.op, args, split=name)
            assert region_of(moved.key, salt=SALT) == name


# ---------------------------------------------------------------------------- reviewer's points
def test_every_argument_word_must_be_a_fact_key() -> None:
    assert prompt_content_key("k1=2;k2=5;k3=1|sort k1 k2 k3\n") == content_key(
        {"k1": 2, "k2": 5, "k3": 1}, "sort", [2, 5, 1]
    )
    # a variant suffix (Suite B) is not an argument
    assert prompt_content_key("k1=2;k2=5|sub k1 k2 reversed\n") == content_key(
        {"k1": 2, "k2": 5}, "sub", [2, 5]
    )
    for bad in (
        "k1=2;k2=5|sort k1 k2 k99\n",  # k99 is no fact: not sort of k1, k2
        "k1=2;k2=5;k3=1;k4=0|sort k1 k2 k3 k4\n",  # more arguments than sort takes
        "k1=2;k2=5|add k1\n",  # fewer
        "k1=2;k2=5|add k1 k2 as k1\n",  # a key after the suffix
        "k1=2;k2=5|mul k1 k2\n",
    ):
        with pytest.raises(ValueError, match="is not a compositional prompt"):
            prompt_content_key(bad)


def test_an_integer_past_the_digit_limit_is_no_answer() -> None:
    """json raises ValueError (not JSONDecodeError) for an integer literal over 4300 digits."""
    assert extract_answer('F:{"answer":' + "1" * 5000 + "}") is None
    assert extract_answer('F:{"answer":12}') == "12"


def test_check_item_space_names_an_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"unknown split name\(s\) \['holdout'\]"):
        check_item_space(CompositionalConfig(), {"train": 10, "holdout": 5})


def test_a_request_the_draws_cannot_fill_fails_fast_naming_the_sizes() -> None:
    """Under the region bound but not fillable: every key already taken (``seen``)."""
    cfg = CompositionalConfig(n_keys=2, min_facts=2, max_facts=2, value_max=2, ops=("add",))
    sizes = {"train": 5, "dev": 0, "test": 0}
    seen: set[str] = set()
    make_compositional(seed=0, sizes={"train": 5, "dev": 0, "test": 0}, config=cfg, seen=seen)
    with pytest.raises(ValueError, match=r"could not fill splits \{'train': 5.*keys were taken"):
        make_compositional(seed=1, sizes=sizes, config=cfg, seen=seen)
