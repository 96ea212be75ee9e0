"""Model factory: tiny models per family, local save/load round trip, offline-only loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bem_tasks.core import (
    FAMILIES,
    ByteTokenizer,
    attach_bem,
    build_config,
    build_model,
    load_model,
    load_tokenizer,
    save_model,
)

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_positions": 64}


@pytest.mark.parametrize("family", FAMILIES)
def test_build_each_family(family: str) -> None:
    model = build_model(family, **SMALL).eval()
    vocab = ByteTokenizer().vocab_size
    assert model.config.vocab_size == vocab
    ids = torch.randint(0, vocab, (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 11, vocab)
    assert torch.isfinite(logits).all()
    # Same seed -> same weights; the global RNG is not consumed.
    state = torch.get_rng_state()
    again = build_model(family, **SMALL)
    assert torch.equal(state, torch.get_rng_state())
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_config_sizes_and_overrides() -> None:
    cfg = build_config("llama", d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (48, 3, 6)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (2, 96)
    assert cfg.pad_token_id == ByteTokenizer().pad_id
    assert build_config("gpt2", tie_word_embeddings=False).tie_word_embeddings is False
    with pytest.raises(ValueError, match="no field 'not_a_field'"):
        build_config("gpt2", not_a_field=1)
    with pytest.raises(ValueError, match="unknown model family 'bert'"):
        build_model("bert")


@pytest.mark.parametrize("family", ["gpt2", "llama", "mamba"])
def test_save_load_round_trip(tmp_path: Path, family: str) -> None:
    model = build_model(family, seed=3, **SMALL).eval()
    target = save_model(model, tmp_path / "model", ByteTokenizer())
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))
    assert not list(tmp_path.glob(".tmp-*"))  # published by rename, nothing left behind
    loaded = load_model(target).eval()
    ids = torch.randint(0, 260, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert load_tokenizer(target).vocab_size == model.config.vocab_size


def test_load_missing_or_incomplete_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_model(tmp_path / "empty")
    save_model(build_model("gpt2", **SMALL), tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path / "m")


def test_save_model_refuses_bem_model(tmp_path: Path) -> None:
    model = build_model("gpt2", **SMALL)
    attach_bem(model)
    with pytest.raises(ValueError, match="has BEM layers"):
        save_model(model, tmp_path / "m")
