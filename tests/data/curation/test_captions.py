"""Caption deduplication keeps distinct captions (issue 21): the normaliser drops presentation
only (case, width, punctuation, whitespace), so captions that differ in a number, a count word,
a negation or a colour stay distinct, while true repeats are still caught; the repeat limit and
the normaliser are validated settings that reach the text stage's signatures.

    python -m pytest -q tests/data/curation/test_captions.py
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.config.curation import CAPTION_NORMALISERS, CurationConfig, DedupConfig
from vlmray.data import schema
from vlmray.data.curation.dedup import REPEATED_CAPTION, Dedup, shingles
from vlmray.data.curation.hashing import normalise_caption, text_signature
from vlmray.data.curation.plan import row_stages
from vlmray.data.curation.text import TextStage

# Real-world-like captions: every pair differs in one meaningful word or number.
DISTINCT = [
    "3 red circles", "2 red circles", "three red circles", "two red circles",
    "photo 16", "photo 0", "Photo 17 of 20",
    "a dog on the sofa", "no dog on the sofa", "a dog not on the sofa", "a cat on the sofa",
    "a red car", "a blue car", "a green car",
    "iPhone 12 Pro, 128 GB", "iPhone 13 Pro, 128 GB", "iPhone 12 Pro, 256 GB",
    "Size 8 women's running shoe", "Size 9 women's running shoe",
    "1990s fashion", "1980s fashion",
    "50% off all jackets", "20% off all jackets",
    "It is -5°C outside", "It is 5°C outside",
    "rated 3.5 stars", "rated 35 stars", "rated 4.5 stars",
    "Route 66 at night", "Route 101 at night",
    "Apollo 11 launch, 1969", "Apollo 13 launch, 1970",
    "page 1 of 3", "page 2 of 3",
    "10:30 am train to Paris", "11:30 am train to Paris",
    "#1 best seller", "#2 best seller",
    "R&B night", "RB night",
]
# Presentation variants of one caption: case, punctuation, whitespace, full-width forms.
REPEATS = ["A red circle.", "a red circle", "A  RED circle!", "a red, circle",
           " a red circle ", "a red circle...", "\"a red circle\"", "Ａ ｒｅｄ ｃｉｒｃｌｅ",
           "a red circle ?"]


def _table(texts: list[str], mode: str = "presentation") -> dict[str, np.ndarray]:
    n = len(texts)
    return {schema.ROW_ID: np.arange(n, dtype=np.int64),
            schema.KEY: np.asarray([f"k{i}" for i in range(n)], dtype=object),
            schema.TEXT_SIG: np.asarray([text_signature(t, mode) for t in texts], dtype=object),
            schema.TEXT: np.asarray(texts, dtype=object)}


def _captions_only(**kw: object) -> Dedup:
    return Dedup(DedupConfig(keys=False, exact=False, near=False, **kw))


def test_captions_differing_in_a_word_or_number_stay_distinct() -> None:
    assert len({normalise_caption(t) for t in DISTINCT}) == len(DISTINCT)
    assert len({text_signature(t) for t in DISTINCT}) == len(DISTINCT)
    for jaccard in (0.0, 0.9):
        d = _captions_only(max_caption_repeats=0, caption_jaccard=jaccard).decide(
            _table(DISTINCT))
        assert len(d) == 0, d.counts()


def test_presentation_variants_are_one_caption() -> None:
    assert {normalise_caption(t) for t in REPEATS} == {"a red circle"}
    d = _captions_only(max_caption_repeats=0).decide(_table(REPEATS + DISTINCT))
    assert d.row_ids.tolist() == list(range(1, len(REPEATS)))
    assert set(d.reasons) == {REPEATED_CAPTION} and set(d.duplicate_of) == {"k0"}
    d = _captions_only(max_caption_repeats=3).decide(_table(REPEATS))
    assert d.row_ids.tolist() == list(range(4, len(REPEATS)))          # 1 + 3 kept


def test_numbered_captions_under_the_default_limit_are_all_kept() -> None:
    """The issue's case: 'photo N' / 'N red circles' rows of a clean set; the old normaliser
    (every number -> 0) made them one caption and dropped all but 16."""
    texts = [f"photo {i}" for i in range(200)] + [f"{i} red circles" for i in range(200)]
    assert len(Dedup().decide({**_table(texts), schema.SHA256: _distinct(len(texts)),
                               schema.PHASH: _far_hashes(len(texts))})) == 0
    digits = _captions_only(caption_normaliser="digits").decide(_table(texts, "digits"))
    assert digits.counts() == {REPEATED_CAPTION: 2 * (200 - 16)}       # the opt-in old rule


def _distinct(n: int) -> np.ndarray:
    return np.asarray([f"sha{i}" for i in range(n)], dtype=object)


def _far_hashes(n: int) -> np.ndarray:
    """Random 64-bit phashes (unrelated images: ~32 bits apart, never near-duplicates)."""
    return np.random.default_rng(0).integers(-2**63, 2**63 - 1, n, dtype=np.int64)


def test_the_normalisers() -> None:
    assert normalise_caption("It's -5.5°C, 50% OFF!") == "it s -5.5°c 50% off"
    assert normalise_caption("1,000 cats; 10:30") == "1,000 cats 10:30"
    assert normalise_caption("Photo 16", "digits") == normalise_caption("photo 0", "digits")
    assert normalise_caption("A red  circle.", "exact") == "A red circle."
    assert normalise_caption("a red circle", "exact") != normalise_caption("A red circle",
                                                                           "exact")
    assert shingles("Two RED circles!", 2) == {"two red", "red circles"}
    with pytest.raises(ValueError, match="valid: presentation, exact, digits"):
        normalise_caption("x", "lower")


def test_settings_are_validated_and_reach_the_text_stage() -> None:
    assert CAPTION_NORMALISERS == ("presentation", "exact", "digits")
    assert DedupConfig().caption_normaliser == "presentation"
    with pytest.raises(ValueError, match="caption_normaliser must be one of presentation, "
                                         "exact, digits, got 'numbers'"):
        DedupConfig(caption_normaliser="numbers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_caption_repeats must be >= 0"):
        DedupConfig(max_caption_repeats=-1)
    cur = CurationConfig(dedup=DedupConfig(caption_normaliser="digits"))
    text = next(s for s in row_stages(cur) if isinstance(s, TextStage))
    batch = {schema.KEY: np.asarray(["a", "b"], dtype=object),
             schema.TEXT: np.asarray([b"photo 16 of a cat", b"Photo 3 of a cat!"], dtype=object)}
    sigs = text(batch)[schema.TEXT_SIG]
    assert sigs[0] == sigs[1] == text_signature("photo 0 of a cat", "digits")
    default = TextStage()(batch)[schema.TEXT_SIG]
    assert default[0] != default[1] and default[0] == text_signature("Photo 16 of a CAT")
