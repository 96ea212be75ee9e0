"""A byte-level tokenizer built locally: ids 0..255 are the UTF-8 bytes, specials follow.

Deterministic, needs no training data or download, and round-trips any text exactly.
``to_hf()`` exposes the same mapping as a ``transformers.PreTrainedTokenizerFast`` built with
the ``tokenizers`` library for code that wants the Hugging Face interface.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from bem_tasks.io import atomic_write_json

TOKENIZER_FILE = "bem_tokenizer.json"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<sep>")
_FORMAT = "bem-byte-tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; ``<pad> <bos> <eos> <sep>`` (+ extras) as ids 256.."""

    def __init__(self, extra_special_tokens: Sequence[str] = ()) -> None:
        tokens = list(SPECIAL_TOKENS) + [str(t) for t in extra_special_tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"duplicate special tokens: {tokens}")
        self.special_tokens = tokens
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(tokens)}

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self._special_to_id["<pad>"]

    @property
    def bos_id(self) -> int:
        return self._special_to_id["<bos>"]

    @property
    def eos_id(self) -> int:
        return self._special_to_id["<eos>"]

    @property
    def sep_id(self) -> int:
        return self._special_to_id["<sep>"]

    def token_id(self, token: str) -> int:
        if token not in self._special_to_id:
            raise KeyError(f"unknown special token {token!r}; known: {self.special_tokens}")
        return self._special_to_id[token]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside vocabulary [0, {self.vocab_size})")
            parts.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special:
                parts.append(self.special_tokens[i - 256])
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        max_length: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        truncation_side: Literal["right", "left"] = "right",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (and optionally truncate) to a batch: (input_ids [B, T], attention_mask [B, T])."""
        seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        if max_length is not None:
            seqs = [s[-max_length:] if truncation_side == "left" else s[:max_length] for s in seqs]
        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
            ids[row, sl] = torch.tensor(s, dtype=torch.long)
            mask[row, sl] = 1
        return ids, mask

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": 1, "special_tokens": self.special_tokens}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        return atomic_write_json(Path(directory) / TOKENIZER_FILE, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ByteTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found (expected {TOKENIZER_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path}: key 'format' must be {_FORMAT!r}")
        specials = data.get("special_tokens")
        if (
            not isinstance(specials, list)
            or not all(isinstance(t, str) for t in specials)
            or specials[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS)
        ):
            raise ValueError(
                f"{path}: key 'special_tokens' must be a list of strings starting with "
                f"{list(SPECIAL_TOKENS)}"
            )
        return cls(extra_special_tokens=specials[len(SPECIAL_TOKENS) :])

    def to_hf(self) -> Any:
        """The same id mapping as a ``PreTrainedTokenizerFast`` (byte-level BPE, no merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        byte_to_char = _bytes_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(self.special_tokens)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token=SPECIAL_TOKENS[0],
            bos_token=SPECIAL_TOKENS[1],
            eos_token=SPECIAL_TOKENS[2],
            sep_token=SPECIAL_TOKENS[3],
            additional_special_tokens=self.special_tokens[len(SPECIAL_TOKENS) :],
        )


def load_tokenizer(directory: str | os.PathLike[str]) -> ByteTokenizer:
    return ByteTokenizer.load(directory)
