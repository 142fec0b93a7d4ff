"""Region columns for region-word matching (GLIP / DetCLIP style): each row's object boxes and
the caption tokens that name each box's phrase. Pure NumPy, no Ray; called by
:func:`vlmray.data.decode.prepare_rows` when ``data.regions = K > 0``.

For row i and box k (the first K boxes of the sidecar's ``boxes``, each with ``phrases[k]``):

    REGION_BOXES[i, k]  = the box (x0, y0, x1, y1) mapped into the decoded (centre-cropped)
                          image, clipped to [0, 1]; zeros when absent or cropped away
    REGION_SPANS[i, k]  = 1 on every caption token position that spells one of the phrase's
                          words (each word also matched in its plural: circle(s), cross(es))
    REGION_MASK[i, k]   = 1 iff the box exists (non-empty after the crop) AND every word of its
                          phrase was found in the caption

so a mismatched caption (another class: its colour or shape word differs) or junk alt-text
gives no region terms. A word is found where its token ids (the tokenizer's, specials removed)
occur contiguously among the caption's real tokens, so the spans are right for the word-level
hash tokenizer and for sub-word tokenizers alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from vlmray.data import schema
from vlmray.data.tokenize import Tokenizer

Crop = tuple[float, float, float, float]


def plural(word: str) -> str:
    """English plural of a shape noun as the built-in captions write it (cross -> crosses)."""
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def map_box(box: object, crop: Crop) -> list[float] | None:
    """A normalised (x0, y0, x1, y1) box of the source image -> the same box in the decoded
    image whose kept window is ``crop``, clipped to [0, 1]; None if malformed or empty."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    cx0, cy0, cx1, cy1 = crop
    sx, sy = cx1 - cx0, cy1 - cy0
    out = [(x0 - cx0) / sx, (y0 - cy0) / sy, (x1 - cx0) / sx, (y1 - cy0) / sy]
    out = [min(max(v, 0.0), 1.0) for v in out]
    if out[2] <= out[0] or out[3] <= out[1]:
        return None
    return out


def _word_ids(words: Sequence[str], tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Each word's token ids with the tokenizer's special ids removed."""
    if not words:
        return {}
    ids, mask = tokenizer(list(words))
    special = set(tokenizer.special_ids)
    return {w: [int(t) for t, m in zip(row, keep) if m and int(t) not in special]
            for w, row, keep in zip(words, ids, mask)}


def _find(seq: list[int], sub: list[int]) -> list[int]:
    """Positions covered by every contiguous occurrence of ``sub`` in ``seq``."""
    n = len(sub)
    hits: list[int] = []
    if n == 0:
        return hits
    for start in range(len(seq) - n + 1):
        if seq[start:start + n] == sub:
            hits.extend(range(start, start + n))
    return hits


def phrase_span(phrase: str, caption_ids: np.ndarray, caption_mask: np.ndarray,
                word_ids: dict[str, list[int]], special: set[int]) -> np.ndarray | None:
    """(L,) int64: 1 on the caption positions of the phrase's words, or None when some word of
    the phrase (in singular or plural) is not in the caption."""
    real = [int(t) if m and int(t) not in special else -1
            for t, m in zip(caption_ids, caption_mask)]
    span = np.zeros(len(real), dtype=np.int64)
    words = phrase.lower().split()
    if not words:
        return None
    for word in words:
        hits = _find(real, word_ids[word]) + _find(real, word_ids[plural(word)])
        if not hits:
            return None
        span[hits] = 1
    return span


def _sidecar(meta: object) -> tuple[list, list]:
    """(boxes, phrases) of a JSON sidecar; empty lists when absent or unreadable."""
    if isinstance(meta, (bytes, bytearray)):
        meta = bytes(meta).decode("utf-8", errors="replace")
    try:
        parsed = json.loads(str(meta)) if meta else {}
    except ValueError:
        return [], []
    if not isinstance(parsed, dict):
        return [], []
    boxes, phrases = parsed.get(schema.BOXES) or [], parsed.get(schema.PHRASES) or []
    if not isinstance(boxes, list) or not isinstance(phrases, list):
        return [], []
    return boxes, [str(p) for p in phrases]


def region_columns(metas: Sequence[object], crops: Sequence[Crop | None], ids: np.ndarray,
                   mask: np.ndarray, k: int, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """REGION_BOXES float32 (n, K, 4), REGION_SPANS int64 (n, K, L), REGION_MASK int64 (n, K)
    for n rows with token ids / mask (n, L); a row whose crop is None (rejected) gets zeros."""
    n, length = ids.shape
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    spans = np.zeros((n, k, length), dtype=np.int64)
    valid = np.zeros((n, k), dtype=np.int64)
    rows = [_sidecar(m) if c is not None else ([], []) for m, c in zip(metas, crops)]
    words = sorted({form for _, phrases in rows for p in phrases[:k] for w in p.lower().split()
                    for form in (w, plural(w))})
    word_ids, special = _word_ids(words, tokenizer), set(tokenizer.special_ids)
    for i, ((row_boxes, phrases), crop) in enumerate(zip(rows, crops)):
        found: dict[str, np.ndarray | None] = {}
        for slot, (box, phrase) in enumerate(zip(row_boxes[:k], phrases[:k])):
            mapped = map_box(box, crop) if crop is not None else None
            if mapped is None:
                continue
            boxes[i, slot] = mapped
            if phrase not in found:
                found[phrase] = phrase_span(phrase, ids[i], mask[i], word_ids, special)
            span = found[phrase]
            if span is not None:
                spans[i, slot], valid[i, slot] = span, 1
    return {schema.REGION_BOXES: boxes, schema.REGION_SPANS: spans, schema.REGION_MASK: valid}


__all__ = ["map_box", "phrase_span", "plural", "region_columns"]
