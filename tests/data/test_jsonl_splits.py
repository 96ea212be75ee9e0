from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import BaseModel

from bem_tasks.data.jsonl import DataFileError, read_jsonl, write_jsonl
from bem_tasks.data.splits import check_disjoint, fill_splits, hash_unit, region_of


class Row(BaseModel):
    name: str
    value: int


def test_roundtrip_and_byte_determinism(tmp_path: Path) -> None:
    rows = [Row(name="a", value=1), Row(name="é", value=2)]
    p = write_jsonl(tmp_path / "x.jsonl", rows)
    assert p.read_text(encoding="utf-8") == '{"name":"a","value":1}\n{"name":"é","value":2}\n'
    assert read_jsonl(p, Row) == rows
    assert write_jsonl(tmp_path / "y.jsonl", [r.model_dump() for r in rows]).read_bytes() == (
        p.read_bytes()
    )
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"name":"a","value":1}\n{"name":"b","value":"x"}\n')
    with pytest.raises(
        DataFileError, match=r"bad\.jsonl:2: value: Input should be a valid integer"
    ):
        read_jsonl(p, Row)
    p.write_text('{"name":"a","value":1}\n{"name":"b",\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl:2: invalid JSON: .* at column"):
        read_jsonl(p, Row)
    p.write_text('{"name":"a","value":1}\n\n{"name":"b","value":2}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl:2: blank line"):
        read_jsonl(p, Row)
    for coerced in ('"1"', "true"):  # strict: no silent coercion
        p.write_text('{"name":"a","value":' + coerced + "}\n")
        with pytest.raises(DataFileError, match=r"bad\.jsonl:1: value: "):
            read_jsonl(p, Row)
    p.write_text('{"value":1}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl:1: name: Field required"):
        read_jsonl(p, Row)
    p.write_text("[1, 2]\n")
    with pytest.raises(DataFileError, match=r"bad\.jsonl:1: <row>: "):
        read_jsonl(p, Row)


def test_empty_and_missing_files_are_rejected(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataFileError, match=r"empty\.jsonl: file is empty"):
        read_jsonl(p, Row)
    with pytest.raises(DataFileError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl", Row)
    with pytest.raises(ValueError, match="refusing to write an empty"):
        write_jsonl(tmp_path / "z.jsonl", [])
    assert not (tmp_path / "z.jsonl").exists()


def test_regions_are_fixed_by_key_not_by_sizes_or_seed() -> None:
    keys = [f"item-{i}" for i in range(4000)]
    regions = [region_of(k, salt="s") for k in keys]
    share = regions.count("train") / len(keys)
    assert 0.77 < share < 0.83  # 80% +- 3 sigma-ish on 4000 draws
    assert regions == [region_of(k, salt="s") for k in keys]
    assert hash_unit("a", salt="s") != hash_unit("a", salt="t")
    assert 0.0 <= hash_unit("a", salt="s") < 1.0
    with pytest.raises(ValueError, match="sum to 1"):
        region_of("a", salt="s", fractions={"train": 0.5, "test": 0.4})


def test_fill_splits_places_items_in_their_region() -> None:
    rng = random.Random(0)
    out = fill_splits(
        lambda: f"k{rng.randrange(10_000)}", lambda k: k, {"train": 50, "test": 20}, salt="s"
    )
    assert {k: len(v) for k, v in out.items()} == {"train": 50, "test": 20}
    for name, items in out.items():
        assert all(region_of(k, salt="s") == name for k in items)
    check_disjoint(out)
    rng = random.Random(0)
    with pytest.raises(ValueError, match="item space is too small"):
        fill_splits(lambda: f"k{rng.randrange(5)}", lambda k: k, {"train": 10}, salt="s")


def test_check_disjoint_reports_overlaps() -> None:
    check_disjoint({"train": ["a", "b"], "test": ["c"]})
    with pytest.raises(ValueError, match=r"train:2 and test:1 share 'b'"):
        check_disjoint({"train": ["a", "b"], "test": ["b"]})
    with pytest.raises(ValueError, match="train:1 and train:3 share 'a'"):
        check_disjoint({"train": ["a", "b", "a"]})
