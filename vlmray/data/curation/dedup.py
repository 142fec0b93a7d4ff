"""Whole-dataset deduplication: repeated keys, identical images, near-duplicate images and
repeated captions, decided over all live rows at once.

The rules run in order (keys, exact, near, captions); a row rejected by one is not seen by the
next. Within a rule the earliest row (by ``ROW_ID``) of a group is kept and every rejected row
names, in ``duplicate_of``, the key of the earliest kept row it duplicates.

Near-duplicate images are found across the whole dataset by multi-index hashing: the 64 phash
bits are split into bands, and by pigeonhole any two hashes within ``threshold`` bits agree
exactly on at least one band, so only rows sharing a band value are compared (exact, not
approximate; see :func:`band_masks`). A row is a near-duplicate when it is within the
threshold of an earlier *kept* row (a ~ b ~ c with c far from a: b goes, c stays).
Near-duplicate captions (optional) use MinHash over word shingles with banded LSH, and every
candidate pair is verified by exact Jaccard.

At scale the global step reaches the same decisions in partitions, one bounded task each
(``DedupConfig.partitions``; :mod:`vlmray.data.curation.dedup_partitioned`).

    decisions = Dedup(DedupConfig(phash_threshold=4)).decide(table)   # table: live rows
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from vlmray.config.curation import DedupConfig
from vlmray.data import schema
from vlmray.data.curation.hashing import hamming, normalise_caption
from vlmray.data.curation.stage import Batch, Decisions, GlobalStage

DUPLICATE_KEY = "duplicate_key"
DUPLICATE_IMAGE = "duplicate_image"
NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
REPEATED_CAPTION = "repeated_caption"
REASONS = (DUPLICATE_KEY, DUPLICATE_IMAGE, NEAR_DUPLICATE_IMAGE, REPEATED_CAPTION)

MINHASH_PERMUTATIONS = 128
MINHASH_SEED = 0x5EED
LSH_RECALL = 0.99                # P(a pair at the Jaccard threshold becomes a candidate)
_PRIME = np.uint64(4294967291)            # largest prime below 2**32: (a*x + b) fits in uint64


class Dedup(GlobalStage):
    """The duplicate rules of a :class:`DedupConfig` over a table of live rows."""

    name: ClassVar[str] = "dedup"
    reasons: ClassVar[tuple[str, ...]] = REASONS
    columns: ClassVar[tuple[str, ...]] = (schema.KEY, schema.SHA256, schema.PHASH,
                                          schema.TEXT_SIG)
    """What :meth:`decide` reads; an instance narrows it to the rules switched on (and adds
    ``TEXT`` when captions are compared by Jaccard)."""

    def __init__(self, cfg: DedupConfig | None = None) -> None:
        self.cfg = cfg or DedupConfig()
        c = self.cfg
        wanted = [(True, schema.KEY), (c.exact, schema.SHA256), (c.near, schema.PHASH),
                  (c.captions, schema.TEXT_SIG),
                  (c.captions and c.caption_jaccard > 0, schema.TEXT)]
        self.columns = tuple(col for on, col in wanted if on)  # type: ignore[misc]

    def enabled(self) -> bool:
        return self.cfg.keys or self.cfg.exact or self.cfg.near or self.cfg.captions

    def decide(self, table: Batch) -> Decisions:
        missing = [c for c in (schema.ROW_ID, *self.columns) if c not in table]
        if missing:
            raise KeyError(f"dedup needs columns {missing}; the table has {sorted(table)}")
        order = np.argsort(np.asarray(table[schema.ROW_ID], dtype=np.int64), kind="stable")
        rows = {c: np.asarray(table[c])[order] for c in (schema.ROW_ID, *self.columns)}
        n = len(order)
        reason = np.full(n, "", dtype=object)
        parent = np.full(n, -1, dtype=np.int64)     # the kept row each rejected row duplicates
        for rule, reject in self._rules():
            alive = np.flatnonzero(reason == "")
            if not len(alive):
                break
            found = rule({c: v[alive] for c, v in rows.items()})
            hit = found >= 0
            reason[alive[hit]] = reject
            parent[alive[hit]] = alive[found[hit]]
        rejected = np.flatnonzero(reason != "")
        return Decisions(row_ids=rows[schema.ROW_ID][rejected], reasons=reason[rejected],
                         duplicate_of=rows[schema.KEY][parent[rejected]].astype(object))

    def decide_uri(self, compact_uri: str, out: str, *,
                   remote_args: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """:meth:`decide` over the compact parquet under ``compact_uri``, as many bounded Ray
        tasks (``cfg.partitions``), writing the decisions under ``<out>/dedup``; None when the
        table is small enough for one task (then the caller runs :meth:`decide`). See
        :func:`vlmray.data.curation.dedup_partitioned.decide_uri`."""
        from vlmray.data.curation.dedup_partitioned import decide_uri

        return decide_uri(self, compact_uri, out, remote_args=remote_args)

    def _rules(self) -> Iterator[tuple[Callable[[Batch], np.ndarray], str]]:
        """(rule, reason) in order; a rule maps a table to per-row ``parent`` (-1 = kept)."""
        c = self.cfg
        if c.keys:
            yield lambda t: first_of_group(t[schema.KEY]), DUPLICATE_KEY
        if c.exact:
            yield lambda t: first_of_group(t[schema.SHA256]), DUPLICATE_IMAGE
        if c.near:
            yield lambda t: near_duplicates(t[schema.PHASH], c.phash_threshold), \
                NEAR_DUPLICATE_IMAGE
        if c.captions:
            yield lambda t: repeated_captions(
                t[schema.TEXT_SIG], c.max_caption_repeats, texts=t.get(schema.TEXT),
                jaccard=c.caption_jaccard, shingle=c.caption_shingle,
                normaliser=c.caption_normaliser), REPEATED_CAPTION


# --- exact groups ------------------------------------------------------------------------------


def first_of_group(values: np.ndarray) -> np.ndarray:
    """Per row: -1 for the first row of its value, else the index of that first row.

    Empty strings (no value) never match anything.
    """
    values = np.asarray(values)
    out = np.full(len(values), -1, dtype=np.int64)
    has = _present(values)
    if not len(has):
        return out
    vals = values[has].astype(str) if values.dtype.kind in "OUS" else values[has]
    _, first, inverse = np.unique(vals, return_index=True, return_inverse=True)
    parent = has[first[inverse.ravel()]]
    dup = parent != has
    out[has[dup]] = parent[dup]
    return out


def _present(values: np.ndarray) -> np.ndarray:
    """Indices of rows that have a value (not ``""`` or None)."""
    if values.dtype.kind not in "OUS":
        return np.arange(len(values))
    return np.flatnonzero((values != "") & np.not_equal(values, None))


def _by_first_occurrence(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values in order of first occurrence: (values, first row, value id per row)."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], first[order], rank[inverse.ravel()]


def _bucket_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs (i, j), i < j, with ``keys[i] == keys[j]``, in chunks (one per offset)."""
    order = np.argsort(keys, kind="stable")          # equal keys stay in index order
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    ends = np.r_[starts[1:], len(sk)]
    later = np.repeat(ends, ends - starts) - np.arange(len(sk)) - 1   # members after this one
    active = np.flatnonzero(later >= 1)
    k = 1
    while len(active):
        yield order[active], order[active + k]
        k += 1
        active = active[later[active] >= k]


# --- near-duplicate images ---------------------------------------------------------------------


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`hashing.hamming`, through NumPy's popcount when there is one (~40x faster)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(np.bitwise_xor(a, b).view(np.uint64)).astype(np.int64)
    return hamming(a, b)


def _block_masks(blocks: int) -> list[int]:
    """64-bit masks of ``blocks`` near-equal runs of bits covering the hash."""
    widths = [64 // blocks + (1 if i < 64 % blocks else 0) for i in range(blocks)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [((1 << w) - 1) << int(s) for s, w in zip(shifts, widths)]


def _key_cost(n: int, threshold: int, blocks: int) -> float:
    """Estimated ns for ``blocks`` blocks: C(blocks, threshold) sorts of n keys, plus checking
    the pairs that share a key of (blocks - threshold) blocks, for uniformly random hashes."""
    keys = math.comb(blocks, threshold)
    bits = (64 // blocks) * (blocks - threshold)
    return keys * (100.0 * n + 25.0 * n * n / 2.0 ** (bits + 1))


def band_blocks(n: int, threshold: int) -> list[int]:
    """The B blocks (64-bit masks) :func:`band_masks` combines, B chosen by cost for n rows."""
    choices = [b for b in range(threshold + 1, 65) if math.comb(b, threshold) <= 4096]
    return _block_masks(min(choices, key=lambda b: _key_cost(n, threshold, b)))


def band_masks(n: int, threshold: int) -> list[int]:
    """Masks of the bit sets compared exactly; any pair within ``threshold`` bits agrees on one.

    Pigeonhole: split the 64 bits into B > threshold blocks; a pair within ``threshold`` bits
    differs in at most ``threshold`` blocks, so some B - threshold blocks agree entirely, and
    each such subset of blocks is one key. B = threshold + 1 is the classic split into bands;
    a larger B makes more but longer keys (fewer candidates); B is chosen by cost for n rows.
    """
    blocks = band_blocks(n, threshold)
    return [sum(m) for m in itertools.combinations(blocks, len(blocks) - threshold)]


def close_pairs(hashes: np.ndarray, threshold: int,
                masks: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i < j, of int64 hashes within ``threshold`` bits, sorted by (j, i).

    Exact, not approximate: see :func:`band_masks`; only pairs sharing a key are compared.
    ``masks`` (default: :func:`band_masks`) narrows the search to pairs sharing one of them.
    """
    h = np.ascontiguousarray(hashes, dtype=np.int64)
    u = h.view(np.uint64)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for mask in (band_masks(len(h), threshold) if masks is None else masks):
        for i, j in _bucket_pairs(u & np.uint64(mask)):
            near = _distance(h[i], h[j]) <= threshold
            found_i.append(i[near])
            found_j.append(j[near])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    pair = np.unique(j * len(h) + i)                 # a pair may share several keys
    return pair % max(len(h), 1), pair // max(len(h), 1)


def _earliest_kept(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Walk nodes in order: a node with an earlier kept neighbour is dropped.

    ``src < dst`` edges sorted by (dst, src); returns per node -1 (kept) or its earliest kept
    earlier neighbour.
    """
    parent = np.full(n, -1, dtype=np.int64)
    if not len(dst):
        return parent
    kept = np.ones(n, dtype=bool)
    bounds = np.r_[np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]]), len(dst)]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        cand = src[a:b]
        hit = cand[kept[cand]]
        if len(hit):
            kept[dst[a]] = False
            parent[dst[a]] = hit[0]
    return parent


def near_duplicates(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Per row (in order): -1 if kept, else the earliest earlier kept row within ``threshold``.

    Rows sharing one hash value are resolved together: only a value's first row can be kept,
    and it is kept unless an earlier kept value is within the threshold.
    """
    hashes = np.asarray(hashes, dtype=np.int64)
    if not len(hashes):
        return np.zeros(0, dtype=np.int64)
    uniq, first, vid = _by_first_occurrence(hashes)
    src, dst = close_pairs(uniq, threshold)
    up = _earliest_kept(src, dst, len(uniq))           # value -> earlier kept value, or -1
    rows = np.arange(len(hashes))
    parent = np.where(up[vid] >= 0, first[np.maximum(up[vid], 0)], first[vid])
    parent[(up[vid] < 0) & (first[vid] == rows)] = -1
    return parent


# --- repeated captions -------------------------------------------------------------------------


def repeated_captions(sigs: np.ndarray, max_repeats: int, *, texts: np.ndarray | None = None,
                      jaccard: float = 0.0, shingle: int = 2,
                      normaliser: str = "presentation") -> np.ndarray:
    """Per row: -1 if kept, else the earliest kept row whose caption it repeats.

    A row is rejected when more than ``max_repeats`` earlier kept rows have a near-duplicate
    caption: the same signature, or (``jaccard > 0``) word-shingle Jaccard >= ``jaccard``
    (shingles of the caption under ``normaliser``).
    """
    sigs = np.asarray(sigs, dtype=object)
    out = np.full(len(sigs), -1, dtype=np.int64)
    has = _present(sigs)
    if not len(has):
        return out
    _, first, vid = _by_first_occurrence(sigs[has].astype(str))
    rank = np.empty(len(has), dtype=np.int64)               # position within its caption group
    order = np.argsort(vid, kind="stable")
    starts = np.flatnonzero(np.r_[True, vid[order][1:] != vid[order][:-1]])
    rank[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    parent = np.where(rank > max_repeats, first[vid], -1)
    if jaccard > 0 and texts is not None:
        groups = similar_captions(np.asarray(texts, dtype=object)[has][first], jaccard, shingle,
                                  normaliser)
        _recount_similar(parent, vid, groups, max_repeats)
    out[has] = np.where(parent >= 0, has[np.maximum(parent, 0)], -1)
    return out


def _recount_similar(parent: np.ndarray, vid: np.ndarray, groups: dict[int, np.ndarray],
                     max_repeats: int) -> None:
    """Redo, row by row, the decisions of rows whose caption has near-duplicate captions."""
    n = int(vid.max()) + 1
    kept = np.zeros(n, dtype=np.int64)                       # per caption: kept rows so far
    first_kept = np.full(n, np.iinfo(np.int64).max)          # per caption: its earliest kept row
    for r in np.flatnonzero(np.isin(vid, list(groups))).tolist():
        g = groups[int(vid[r])]
        if kept[g].sum() > max_repeats:
            parent[r] = first_kept[g].min()
        else:
            parent[r] = -1
            kept[vid[r]] += 1
            first_kept[vid[r]] = min(first_kept[vid[r]], r)


def shingles(text: str, n: int, normaliser: str = "presentation") -> set[str]:
    """Word n-grams of the normalised caption (the whole caption when shorter than n)."""
    words = normalise_caption(text, normaliser).split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def minhash(sets: list[set[str]], num_perm: int = MINHASH_PERMUTATIONS,
            seed: int = MINHASH_SEED) -> np.ndarray:
    """(N, num_perm) uint64 MinHash signatures: min over a set of ``(a*crc32(x) + b) mod p``."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64)
    sig = np.full((len(sets), num_perm), _PRIME, dtype=np.uint64)
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    x = np.fromiter((zlib.crc32(w.encode()) for s in sets for w in sorted(s)), dtype=np.uint64,
                    count=int(sizes.sum())) % _PRIME
    offsets = np.r_[0, np.cumsum(sizes)]
    chunk = max(1, (1 << 18) // num_perm)                   # rows per step (~2.5M values)
    nonempty = np.flatnonzero(sizes)
    for lo in range(0, len(nonempty), chunk):
        rows = nonempty[lo:lo + chunk]
        s0, s1 = offsets[rows[0]], offsets[rows[-1] + 1]
        h = (x[s0:s1, None] * a + b) % _PRIME              # (S, P)
        sig[rows] = np.minimum.reduceat(h, offsets[rows] - s0, axis=0)
    return sig


def lsh_bands(threshold: float, num_perm: int = MINHASH_PERMUTATIONS) -> tuple[int, int]:
    """(bands, rows per band): the most rows whose candidate probability at ``threshold``,
    ``1 - (1 - t**r)**b``, is still at least :data:`LSH_RECALL`."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= LSH_RECALL:
            best = (b, r)
    return best


def similar_captions(texts: np.ndarray, jaccard: float, shingle: int,
                     normaliser: str = "presentation") -> dict[int, np.ndarray]:
    """Caption index -> indices of captions (itself included) with shingle Jaccard >= ``jaccard``,
    for captions that have any other; MinHash LSH candidates, verified exactly."""
    sets = [shingles(str(t), shingle, normaliser) for t in texts]
    sig = minhash(sets)
    bands, r = lsh_bands(jaccard, sig.shape[1])
    mult = np.random.default_rng(MINHASH_SEED + 1).integers(1, 2**63, r, dtype=np.uint64) | 1
    empty = np.array([not s for s in sets])
    cand = []
    for band in range(bands):
        key = (sig[:, band * r:(band + 1) * r] * mult).sum(axis=1, dtype=np.uint64)
        key[empty] = np.arange(int(empty.sum()), dtype=np.uint64) + np.uint64(2**63)
        cand += [i * len(texts) + j for i, j in _bucket_pairs(key)]
    pairs = np.unique(np.concatenate(cand)) if cand else np.zeros(0, np.int64)
    near: dict[int, list[int]] = {}
    for i, j in zip((pairs // len(texts)).tolist(), (pairs % len(texts)).tolist()):
        a, b = sets[i], sets[j]
        if a and b and len(a & b) >= jaccard * len(a | b):
            near.setdefault(i, [i]).append(j)
            near.setdefault(j, [j]).append(i)
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in near.items()}


__all__ = ["DUPLICATE_IMAGE", "DUPLICATE_KEY", "NEAR_DUPLICATE_IMAGE", "REASONS",
           "REPEATED_CAPTION", "Dedup", "band_blocks", "band_masks", "close_pairs",
           "first_of_group", "minhash", "near_duplicates", "repeated_captions", "shingles",
           "similar_captions"]
