"""Tokenisers: the offline hash tokenizer's layout, and local Hugging Face tokenizers.

    pytest tests/data/test_tokenize.py -q
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from vlmray.data.tokenize import BOS, EOS, MASK, PAD, HashTokenizer, build_tokenizer

TEXTS = ["A photo of a red circle.", "", "   ", "two LARGE blue squares, on the left!",
         " ".join(f"w{i}" for i in range(50))]


def reference_ids(text: str, vocab_size: int, context_length: int) -> list[int]:
    """Plain re-statement: words/punctuation -> 4 + crc32 % (V - 4), BOS ... EOS, PAD to L
    (ids 0-3: PAD, BOS, EOS, MASK)."""
    words, word = [], ""
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            word += ch
            continue
        if word:
            words.append(word)
            word = ""
        if not ch.isspace():
            words.append(ch)
    if word:
        words.append(word)
    body = [4 + zlib.crc32(w.encode()) % (vocab_size - 4) for w in words][: context_length - 2]
    row = [BOS, *body, EOS]
    return row + [PAD] * (context_length - len(row))


def test_hash_tokenizer_matches_reference_layout() -> None:
    tok = HashTokenizer(vocab_size=97, context_length=12)
    ids, mask = tok(TEXTS)
    assert ids.shape == mask.shape == (len(TEXTS), 12)
    assert ids.dtype == mask.dtype == np.int64
    for row, text in zip(ids, TEXTS):
        assert row.tolist() == reference_ids(text, 97, 12)
    assert ids[0, 0] == BOS and ids[0, 8] == EOS                   # 6 words + "." -> 7 tokens
    assert (ids[0, 1:8] >= 4).all() and (ids[0, 9:] == PAD).all()


def test_hash_tokenizer_is_deterministic_and_case_insensitive() -> None:
    a = HashTokenizer(vocab_size=8192, context_length=16)
    b = HashTokenizer(vocab_size=8192, context_length=16)
    ids_a, _ = a(TEXTS)
    ids_b, _ = b(list(TEXTS))
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(a(["Red CIRCLE"])[0], a(["red circle"])[0])
    assert a(["red circle"])[0].tolist() != a(["blue circle"])[0].tolist()


def test_empty_text_is_bos_eos_then_padding() -> None:
    ids, mask = HashTokenizer(context_length=6)(["", "  \t"])
    assert ids.tolist() == [[BOS, EOS, PAD, PAD, PAD, PAD]] * 2
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0]] * 2


def test_truncation_keeps_bos_and_eos() -> None:
    tok = HashTokenizer(context_length=8)
    ids, mask = tok([" ".join(["word"] * 100)])
    assert ids.shape == (1, 8)
    assert ids[0, 0] == BOS and ids[0, -1] == EOS
    assert mask.sum() == 8 and (ids[0, 1:-1] >= 4).all()


@pytest.mark.parametrize("vocab_size", [5, 50, 8192])
def test_mask_matches_ids_and_ids_stay_in_vocab(vocab_size: int) -> None:
    ids, mask = HashTokenizer(vocab_size=vocab_size, context_length=20)(TEXTS)
    np.testing.assert_array_equal(mask, (ids != PAD).astype(np.int64))
    assert ids.min() >= 0 and ids.max() < vocab_size
    body = ids[(ids != PAD) & (ids != BOS) & (ids != EOS)]
    assert (body >= 4).all()                                        # specials never collide
    lengths = mask.sum(1)
    for row, n in zip(mask, lengths):                               # real tokens, then padding
        assert row[:n].all() and not row[n:].any()


def test_hash_tokenizer_rejects_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="vocab_size > 4"):
        HashTokenizer(vocab_size=4)
    with pytest.raises(ValueError, match="context_length >= 3"):
        HashTokenizer(context_length=2)


def test_build_tokenizer_names() -> None:
    tok = build_tokenizer("hash", vocab_size=100, context_length=10)
    assert isinstance(tok, HashTokenizer) and (tok.vocab_size, tok.context_length) == (100, 10)
    with pytest.raises(ValueError) as e:
        build_tokenizer("bpe", vocab_size=100, context_length=10)
    assert "unknown tokenizer 'bpe'" in str(e.value) and "'hash'" in str(e.value)
    assert "hf:" in str(e.value)


def test_hf_tokenizer_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        build_tokenizer(f"hf:{missing}", vocab_size=100, context_length=10)


def test_hf_tokenizer_from_local_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A word-level tokenizer saved with save_pretrained loads offline, padded to L."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "red": 3, "circle": 4, "blue": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    tok = build_tokenizer(f"hf:{tmp_path / 'tok'}", vocab_size=0, context_length=4)
    assert tok.vocab_size == len(vocab) and tok.context_length == 4
    ids, mask = tok(["a red circle", "blue", "a red red red circle"])
    assert ids.dtype == mask.dtype == np.int64
    assert ids.tolist() == [[2, 3, 4, 0], [5, 0, 0, 0], [2, 3, 3, 3]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_hash_mask_id_is_special_and_never_a_word() -> None:
    tok = HashTokenizer(vocab_size=5, context_length=64)
    assert tok.mask_id == MASK == 3 and set(tok.special_ids) == {PAD, BOS, EOS, MASK}
    ids, _ = tok([" ".join(f"w{i}" for i in range(60))])          # every word hashes to id 4
    assert (ids[0, 1:61] == 4).all() and ids[0, 61] == EOS


def _save_hf(path: Path, **specials: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "a": 3, "red": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                            **specials).save_pretrained(path)


def test_hf_mask_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _save_hf(tmp_path / "with", mask_token="[MASK]")
    tok = build_tokenizer(f"hf:{tmp_path / 'with'}", vocab_size=0, context_length=4)
    assert tok.mask_id == 2 and set(tok.special_ids) == {0, 1, 2}
    _save_hf(tmp_path / "without")
    tok = build_tokenizer(f"hf:{tmp_path / 'without'}", vocab_size=0, context_length=4)
    with pytest.raises(ValueError, match="no mask token"):
        tok.mask_id  # noqa: B018
