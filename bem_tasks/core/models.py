"""Model factory: tiny models from transformers configs (smoke) and local directories (full).

Nothing here downloads: ``build_model`` initialises weights from a config, and ``load_model``
only reads a local directory (``local_files_only=True`` with the hub switched offline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Set before transformers / huggingface_hub are imported anywhere through this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bem_tasks.core.bem import bem_layers  # noqa: E402
from bem_tasks.core.checkpoint import atomic_directory  # noqa: E402
from bem_tasks.core.tokenizer import ByteTokenizer  # noqa: E402

FAMILIES: tuple[str, ...] = ("gpt2", "llama", "mistral", "mamba")


def build_config(
    family: str,
    *,
    vocab_size: int | None = None,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_ff: int | None = None,
    max_positions: int = 1024,
    state_size: int = 16,
    dropout: float = 0.0,
    **overrides: Any,
) -> Any:
    """A transformers config for a small model of ``family``; ``overrides`` go to the config."""
    from transformers import GPT2Config, LlamaConfig, MambaConfig, MistralConfig

    tok = ByteTokenizer()
    vocab = tok.vocab_size if vocab_size is None else vocab_size
    ids: dict[str, Any] = {
        "pad_token_id": tok.pad_id,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
    }
    d_ff = 4 * d_model if d_ff is None else d_ff
    cfg: Any
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=max_positions,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_ff,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **ids,
        )
    elif family in ("llama", "mistral"):
        cls = LlamaConfig if family == "llama" else MistralConfig
        cfg = cls(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads or n_heads,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            **ids,
        )
    elif family == "mamba":
        cfg = MambaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            state_size=state_size,
            num_hidden_layers=n_layers,
            **ids,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"{type(cfg).__name__} has no field {key!r} (override for {family})")
        setattr(cfg, key, value)
    return cfg


def build_model(family: str, *, seed: int = 0, **size_kwargs: Any) -> Any:
    """A freshly initialised causal LM of ``family`` (deterministic for a given seed; the global
    RNG is left untouched). ``size_kwargs`` are ``build_config``'s keyword arguments."""
    from transformers import AutoModelForCausalLM

    cfg = build_config(family, **size_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model


def save_model(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: ByteTokenizer | None = None
) -> Path:
    """``save_pretrained`` (safetensors) into a temp directory, then rename into place."""
    if bem_layers(model):
        raise ValueError(
            "save_model writes a plain Hugging Face directory; this model has BEM layers. "
            "Save the BEM weights with save_weights / CheckpointManager, or detach_bem first."
        )
    final = Path(directory)
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save(tmp)
    return final


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Load a causal LM from a local directory; never downloads."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"model directory {p} does not exist; the full profile loads local weights only "
            "(nothing is downloaded): point the config at a directory holding config.json and "
            "*.safetensors"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p / 'config.json'} missing: not a saved model directory")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(f"{p}: no *.safetensors weights (only safetensors are loaded)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model: Any = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    if device is not None:
        model = model.to(device)
    return model
