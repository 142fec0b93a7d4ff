"""Offline tokenisers: text -> fixed-length token ids and a padding mask.

``hash`` needs no files at all: lower-cased words and punctuation are hashed (CRC32) into a
fixed vocabulary, so any text maps to ids deterministically on every worker; ids 0-3 are the
specials ``PAD``, ``BOS``, ``EOS`` and ``MASK`` (masked language modelling, ``data.views``).
``hf:<dir>`` loads a Hugging Face tokenizer from a local directory (never from the hub).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

PAD, BOS, EOS, MASK = 0, 1, 2, 3
_N_SPECIAL = 4
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class Tokenizer(Protocol):
    vocab_size: int
    context_length: int
    special_ids: tuple[int, ...]
    """Ids that never stand for a word (padding, begin/end, mask...); MLM never masks them."""

    @property
    def mask_id(self) -> int:
        """The ``[MASK]`` id masked language modelling substitutes; raises if there is none."""
        ...

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(ids, mask)``, both int64 of shape (B, context_length)."""
        ...


class HashTokenizer:
    """Word-level tokeniser with a hashed vocabulary: ``[BOS] w_1 ... w_k [EOS] [PAD]...``."""

    mask_id = MASK
    special_ids = (PAD, BOS, EOS, MASK)

    def __init__(self, vocab_size: int = 8192, context_length: int = 32) -> None:
        if vocab_size <= _N_SPECIAL or context_length < 3:
            raise ValueError(f"hash tokenizer needs vocab_size > {_N_SPECIAL} and "
                             "context_length >= 3")
        self.vocab_size = vocab_size
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())[: self.context_length - 2]
        ids = [_N_SPECIAL + zlib.crc32(w.encode()) % (self.vocab_size - _N_SPECIAL) for w in words]
        return [BOS, *ids, EOS]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), self.context_length), PAD, dtype=np.int64)
        for i, text in enumerate(texts):
            row = self.encode(text)
            ids[i, : len(row)] = row
        return ids, (ids != PAD).astype(np.int64)


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (``local_files_only``)."""

    def __init__(self, path: str, context_length: int = 32) -> None:
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        self.vocab_size = len(self._tok)
        self.context_length = context_length
        self.special_ids = tuple(sorted(set(self._tok.all_special_ids)))

    @property
    def mask_id(self) -> int:
        mask = self._tok.mask_token_id
        if mask is None:
            raise ValueError(f"tokenizer {self.path!r} has no mask token (mask_token_id is None): "
                             "masked language modelling (data.views.mlm_prob > 0) needs one; "
                             "save the tokenizer with mask_token='[MASK]' or set mlm_prob=0")
        return int(mask)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok(list(texts), padding="max_length", truncation=True,
                        max_length=self.context_length, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def build_tokenizer(name: str, *, vocab_size: int, context_length: int) -> Tokenizer:
    """``"hash"`` or ``"hf:/local/dir"``; anything else raises naming the valid forms."""
    if name == "hash":
        return HashTokenizer(vocab_size, context_length)
    if name.startswith("hf:"):
        return HFTokenizer(name[3:], context_length)
    raise ValueError(f"unknown tokenizer {name!r}; valid: 'hash', 'hf:<local directory>'")


__all__ = ["HFTokenizer", "HashTokenizer", "Tokenizer", "build_tokenizer", "PAD", "BOS", "EOS",
           "MASK"]
