"""Whole-dataset deduplication: each rule on hand-made tables, rule order, determinism, a
brute-force cross-check of the near-duplicate search, and near-duplicates of real photos.

    pytest tests/data/curation/test_dedup.py -q
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from vlmray.config.curation import DedupConfig
from vlmray.data import schema
from vlmray.data.curation.dedup import (
    DUPLICATE_IMAGE,
    DUPLICATE_KEY,
    NEAR_DUPLICATE_IMAGE,
    REASONS,
    REPEATED_CAPTION,
    Dedup,
    band_masks,
    close_pairs,
    near_duplicates,
    shingles,
)
from vlmray.data.curation.hashing import hamming, phash, sha256_hex, text_signature
from vlmray.data.curation.stage import Decisions

BASE = np.int64(0x1234_5678_9ABC_DEF0)


def flip(h: np.int64 | int, bits: list[int]) -> int:
    """``h`` with the given bit positions inverted."""
    u = np.asarray(h, dtype=np.int64).view(np.uint64)
    for b in bits:
        u = u ^ np.uint64(1 << b)
    return int(u.view(np.int64))


def table(keys: list[str], *, sha: list[str] | None = None, phash_: list[int] | None = None,
          text: list[str] | None = None, row_ids: list[int] | None = None) -> dict:
    """A live-row table; unspecified signals are all distinct (so only one rule can fire)."""
    n = len(keys)
    rng = np.random.default_rng(n)
    text = text if text is not None else [f"caption number {i}" for i in range(n)]
    return {
        schema.ROW_ID: np.asarray(row_ids if row_ids is not None else range(n), dtype=np.int64),
        schema.KEY: np.asarray(keys, dtype=object),
        schema.SHA256: np.asarray(sha if sha is not None else [f"s{i}" for i in range(n)],
                                  dtype=object),
        schema.PHASH: np.asarray(phash_ if phash_ is not None
                                 else rng.integers(-2**63, 2**63 - 1, n), dtype=np.int64),
        schema.TEXT_SIG: np.asarray([text_signature(t) for t in text], dtype=object),
        schema.TEXT: np.asarray(text, dtype=object),
    }


def rejected(d: Decisions) -> dict[int, tuple[str, str]]:
    """row_id -> (reason, duplicate_of)."""
    assert d.duplicate_of is not None
    return {int(r): (str(why), str(of)) for r, why, of in zip(d.row_ids, d.reasons,
                                                               d.duplicate_of)}


def keys(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


# --- one rule at a time ------------------------------------------------------------------------


def test_duplicate_keys_keep_the_first() -> None:
    d = Dedup().decide(table(["a", "b", "a", "c", "b", "a"]))
    assert rejected(d) == {2: (DUPLICATE_KEY, "a"), 4: (DUPLICATE_KEY, "b"),
                           5: (DUPLICATE_KEY, "a")}


def test_identical_image_bytes() -> None:
    d = Dedup().decide(table(keys(7), sha=["x", "y", "x", "x", "", "z", ""]))
    assert rejected(d) == {2: (DUPLICATE_IMAGE, "k0"), 3: (DUPLICATE_IMAGE, "k0")}  # "" = none


@pytest.mark.parametrize("threshold", [0, 1, 4, 7])
def test_phash_at_threshold_and_one_past(threshold: int) -> None:
    spread = [int(b) for b in np.linspace(0, 63, threshold + 1).round()]     # across bands
    hashes = [BASE,
              flip(BASE, list(range(threshold))),           # exactly at the threshold, one band
              flip(BASE, spread[:threshold]),               # at the threshold, spread out
              flip(BASE, list(range(20, 21 + threshold))),  # one past it
              flip(BASE, spread)]                           # one past it, spread out
    d = Dedup(DedupConfig(phash_threshold=threshold)).decide(table(keys(5), phash_=hashes))
    assert [int(hamming(hashes[0], h)) for h in hashes] == [0, threshold, threshold,
                                                             threshold + 1, threshold + 1]
    assert int(hamming(hashes[3], hashes[4])) > threshold
    assert rejected(d) == {1: (NEAR_DUPLICATE_IMAGE, "k0"), 2: (NEAR_DUPLICATE_IMAGE, "k0")}


def test_chain_only_kept_rows_count() -> None:
    a = int(BASE)
    b = flip(a, [0, 1, 2, 3])                 # a ~ b (distance 4)
    c_far = flip(b, [30, 31, 32, 33])         # b ~ c_far, but 8 from a: kept (b is gone)
    c_close = flip(a, [0, 1, 40])             # near both a and b: a duplicate of a
    assert [int(hamming(x, y)) for x, y in ((a, c_far), (b, c_far), (a, c_close),
                                            (b, c_close))] == [8, 4, 3, 3]
    d = Dedup().decide(table(keys(3), phash_=[a, b, c_far]))
    assert rejected(d) == {1: (NEAR_DUPLICATE_IMAGE, "k0")}
    d = Dedup().decide(table(keys(3), phash_=[a, b, c_close]))
    assert rejected(d) == {1: (NEAR_DUPLICATE_IMAGE, "k0"), 2: (NEAR_DUPLICATE_IMAGE, "k0")}


def test_duplicate_of_is_the_earliest_kept_match() -> None:
    x, y = int(BASE), flip(BASE, list(range(6)))     # 6 apart: both kept
    z = flip(BASE, [0, 1, 2])                        # 3 from each
    far = flip(BASE, list(range(0, 64, 2)))
    near_far = flip(far, [1])
    d = Dedup().decide(table(keys(5), phash_=[far, y, x, z, near_far]))
    assert rejected(d) == {3: (NEAR_DUPLICATE_IMAGE, "k1"), 4: (NEAR_DUPLICATE_IMAGE, "k0")}


def test_captions_repeated_beyond_the_limit() -> None:
    text = ["A photo of a DOG!", "click here", "a photo of a dog", "Click here.",
            "a photo of  a dog", "click  HERE", "a cat", "a photo of a dog."]
    d = Dedup(DedupConfig(max_caption_repeats=2)).decide(table(keys(8), text=text))
    assert rejected(d) == {7: (REPEATED_CAPTION, "k0")}
    d = Dedup(DedupConfig(max_caption_repeats=0)).decide(table(keys(8), text=text))
    assert rejected(d) == {2: (REPEATED_CAPTION, "k0"), 3: (REPEATED_CAPTION, "k1"),
                           4: (REPEATED_CAPTION, "k0"), 5: (REPEATED_CAPTION, "k1"),
                           7: (REPEATED_CAPTION, "k0")}


LONG = ("a wooden table with three ceramic bowls of fresh fruit next to an open window with "
        "white curtains on a sunny summer afternoon in the countryside")


def test_minhash_catches_a_one_word_edit() -> None:
    edit = LONG.replace("sunny", "bright")
    other = "a red bicycle leaning against a brick wall in a narrow street at night in the rain"
    a, b = shingles(LONG, 2), shingles(edit, 2)
    assert 0.8 <= len(a & b) / len(a | b) < 1.0
    text = [LONG, other, edit, LONG.upper()]
    cfg = DedupConfig(max_caption_repeats=0, caption_jaccard=0.8)
    d = Dedup(cfg).decide(table(keys(4), text=text))
    assert rejected(d) == {2: (REPEATED_CAPTION, "k0"), 3: (REPEATED_CAPTION, "k0")}
    exact_only = Dedup(DedupConfig(max_caption_repeats=0)).decide(table(keys(4), text=text))
    assert rejected(exact_only) == {3: (REPEATED_CAPTION, "k0")}
    strict = Dedup(DedupConfig(max_caption_repeats=0, caption_jaccard=0.95))
    assert rejected(strict.decide(table(keys(4), text=text))) == {3: (REPEATED_CAPTION, "k0")}


def test_minhash_counts_near_duplicates_of_kept_captions() -> None:
    edits = [LONG.replace("sunny", w) for w in ("sunny", "bright", "warm", "hot", "calm")]
    cfg = DedupConfig(max_caption_repeats=2, caption_jaccard=0.8)
    d = Dedup(cfg).decide(table(keys(5), text=edits))
    assert rejected(d) == {3: (REPEATED_CAPTION, "k0"), 4: (REPEATED_CAPTION, "k0")}


# --- rule order, determinism, configuration ----------------------------------------------------


def test_rejected_rows_are_not_seen_by_later_rules() -> None:
    h0 = int(BASE)
    h1 = flip(h0, list(range(30, 40)))        # far from h0
    h2 = flip(h1, [50])                       # near h1 only
    t = table(["a", "b", "c"], sha=["x", "x", "y"], phash_=[h0, h1, h2])
    # row 1 goes as a copy of row 0's bytes; row 2 was near row 1 only, so it stays
    assert rejected(Dedup().decide(t)) == {1: (DUPLICATE_IMAGE, "a")}
    assert rejected(Dedup(DedupConfig(exact=False)).decide(t)) == {
        2: (NEAR_DUPLICATE_IMAGE, "b")}
    t = table(["a", "a"], sha=["x", "x"], phash_=[h0, h0], text=["same", "same"])
    got = Dedup(DedupConfig(max_caption_repeats=0)).decide(t)
    assert rejected(got) == {1: (DUPLICATE_KEY, "a")}           # the first rule wins


def test_decisions_do_not_depend_on_table_order() -> None:
    rng = np.random.default_rng(3)
    n = 300
    base = rng.integers(-2**63, 2**63 - 1, 60)
    hashes = [flip(base[i % 60], list(rng.choice(64, rng.integers(0, 7), replace=False)))
              for i in range(n)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = [f"caption about {letters[i % 26]} and {letters[i % 10]}" for i in range(n)]
    t = table([f"k{i % 290}" for i in range(n)], sha=[f"s{i % 280}" for i in range(n)],
              phash_=hashes, text=text, row_ids=list(rng.permutation(10 * n)[:n]))
    cfg = DedupConfig(max_caption_repeats=3, caption_jaccard=0.5)
    ref = Dedup(cfg).decide(t)
    assert len(ref) > 100 and set(ref.counts()) == set(REASONS)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        d = Dedup(cfg).decide({k: v[perm] for k, v in t.items()})
        assert d.row_ids.tolist() == ref.row_ids.tolist()
        assert d.reasons.tolist() == ref.reasons.tolist()
        assert d.duplicate_of.tolist() == ref.duplicate_of.tolist()


def test_config_validation_and_columns() -> None:
    for bad in ({"phash_threshold": -1}, {"phash_threshold": 17}, {"max_caption_repeats": -1},
                {"caption_jaccard": 1.5}, {"caption_shingle": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DedupConfig(**bad)
    assert Dedup().columns == (schema.KEY, schema.SHA256, schema.PHASH, schema.TEXT_SIG)
    assert Dedup(DedupConfig(near=False, caption_jaccard=0.8)).columns == (
        schema.KEY, schema.SHA256, schema.TEXT_SIG, schema.TEXT)
    off = DedupConfig(keys=False, exact=False, near=False, captions=False)
    assert not Dedup(off).enabled() and Dedup().enabled()
    with pytest.raises(KeyError, match="phash"):
        Dedup().decide({k: v for k, v in table(keys(3)).items() if k != schema.PHASH})
    assert len(Dedup().decide(table([]))) == 0


# --- the near-duplicate search against brute force ---------------------------------------------


def brute_force(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """O(n^2) reference: -1 if kept, else the earliest kept earlier row within threshold."""
    parent = np.full(len(hashes), -1)
    kept: list[int] = []
    for j, h in enumerate(hashes):
        near = [i for i, d in zip(kept, hamming(hashes[kept], h)) if d <= threshold]
        if near:
            parent[j] = near[0]
        else:
            kept.append(j)
    return parent


@pytest.mark.parametrize("threshold", [0, 3, 4, 10])
def test_near_duplicates_equal_brute_force(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    n = 2000
    hashes = rng.integers(-2**63, 2**63 - 1, n)
    for src, dst in rng.integers(0, n, (700, 2)):        # chains, ties, exact repeats
        bits = rng.choice(64, rng.integers(0, threshold + 3), replace=False)
        hashes[dst] = flip(hashes[src], list(bits))
    expected = brute_force(hashes, threshold)
    assert (expected >= 0).sum() > 100
    assert near_duplicates(hashes, threshold).tolist() == expected.tolist()


def test_close_pairs_are_all_pairs_within_threshold() -> None:
    rng = np.random.default_rng(7)
    hashes = rng.integers(-2**63, 2**63 - 1, 400)
    hashes[200:] = [flip(h, list(rng.choice(64, 5, replace=False))) for h in hashes[:200]]
    d = hamming(hashes[:, None], hashes[None, :])
    want = {(i, j) for i, j in zip(*np.nonzero(np.triu(d <= 6, 1)))}
    i, j = close_pairs(hashes, 6)
    assert set(zip(i.tolist(), j.tolist())) == want


@pytest.mark.parametrize("n,threshold", [(2000, 4), (10**6, 4), (10**6, 6), (8000, 10)])
def test_every_flip_pattern_leaves_one_band_intact(n: int, threshold: int) -> None:
    masks = band_masks(n, threshold)
    rng = np.random.default_rng(threshold)
    for _ in range(2000):
        flipped = sum(1 << int(b) for b in rng.choice(64, threshold, replace=False))
        assert any(m & flipped == 0 for m in masks)
    for bits in itertools.combinations(range(0, 64, 9), min(threshold, 7)):  # structured ones
        assert any(m & sum(1 << b for b in bits) == 0 for m in masks)


# --- real photos -------------------------------------------------------------------------------


def encode(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    data = pytest.importorskip("skimage.data")
    names = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "clock",
             "immunohistochemistry", "hubble_deep_field")
    return {n: Image.fromarray(getattr(data, n)()).convert("RGB") for n in names}


def test_near_duplicates_of_real_photos(photos: dict[str, Image.Image]) -> None:
    rows: list[tuple[str, bytes]] = [(name, encode(im)) for name, im in photos.items()]
    for name, im in photos.items():
        w, h = im.size
        rows += [(f"{name}-small", encode(im.resize((w // 2, h // 2), Image.BICUBIC))),
                 (f"{name}-q30", encode(im, quality=30)),
                 (f"{name}-bright", encode(ImageEnhance.Brightness(im).enhance(1.1))),
                 (f"{name}-copy", encode(im))]
    hashes = [phash(Image.open(io.BytesIO(data))) for _, data in rows]
    t = table([k for k, _ in rows], sha=[sha256_hex(data) for _, data in rows], phash_=hashes)
    got = rejected(Dedup().decide(t))
    originals = len(photos)
    assert all(i not in got for i in range(originals))              # different photos stay
    for i in range(originals, len(rows)):
        key = rows[i][0]
        reason = DUPLICATE_IMAGE if key.endswith("-copy") else NEAR_DUPLICATE_IMAGE
        assert got[i] == (reason, key.rsplit("-", 1)[0]), key
