"""Byte-level tokenizer: exact round trips, specials, batching, save/load, HF view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bem_tasks.core import ByteTokenizer, load_tokenizer

TEXT = 'Héllo wörld {"answer": 42}\n日本語 \t end'


def test_ids_and_round_trip() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (256, 257, 258, 259)
    assert tok.vocab_size == len(tok) == 260
    assert tok.encode("Az") == [65, 122]
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT
    assert tok.decode([65, tok.sep_id, 66], skip_special=False) == "A<sep>B"
    with pytest.raises(ValueError, match="outside vocabulary"):
        tok.decode([999])


def test_encode_batch_padding_and_truncation() -> None:
    tok = ByteTokenizer()
    ids, mask = tok.encode_batch(["ab", "abcd"], add_eos=True)
    assert ids.tolist() == [[97, 98, 258, 256, 256], [97, 98, 99, 100, 258]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    ids, mask = tok.encode_batch(["ab", "abcd"], padding_side="left", max_length=3)
    assert ids.tolist() == [[256, 97, 98], [97, 98, 99]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    ids, _ = tok.encode_batch(["abcd"], max_length=2, truncation_side="left")
    assert ids.tolist() == [[99, 100]]


def test_save_load_round_trip(tmp_path: Path) -> None:
    tok = ByteTokenizer(extra_special_tokens=["<retrieve>", "<reason>"])
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.token_id("<reason>") == 261 and loaded.vocab_size == 262
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bem_tokenizer.json"):
        ByteTokenizer.load(tmp_path)
    path = tmp_path / "bem_tokenizer.json"
    path.write_text('{"format": "bem-byte-tokenizer",\n "special_tokens": [}')
    with pytest.raises(ValueError, match=r"bem_tokenizer.json: not valid JSON \(line 2\)"):
        ByteTokenizer.load(tmp_path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="key 'format'"):
        ByteTokenizer.load(tmp_path)
    path.write_text(json.dumps({"format": "bem-byte-tokenizer", "special_tokens": ["<x>"]}))
    with pytest.raises(ValueError, match="key 'special_tokens'"):
        ByteTokenizer.load(tmp_path)


def test_hf_view_matches() -> None:
    tok = ByteTokenizer(extra_special_tokens=["<retrieve>"])
    hf = tok.to_hf()
    assert len(hf) == tok.vocab_size
    assert hf.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert hf.decode(tok.encode(TEXT)) == TEXT
    assert hf.encode("<bos>a<retrieve>", add_special_tokens=False) == [257, 97, 260]
    assert (hf.pad_token_id, hf.eos_token_id) == (tok.pad_id, tok.eos_id)
