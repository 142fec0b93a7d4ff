"""Decode and validate raw samples into training tensors. Pure NumPy/PIL, no Ray.

Used by the Ray Data ingest stage and by evaluation, so train and eval rows are prepared the
same way. A bad row is never an exception: it comes back with a ``reject_reason``. Images are
opened by curation's guarded decode (:func:`vlmray.data.curation.images.decode_rgb`): web
formats only, a header pixel limit checked before any pixel is decoded, bombs and truncation
as reasons, so training rejects what curation rejects, for the same reasons.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmray.config.curation import ImageConfig
from vlmray.data import schema
from vlmray.data.curation.images import (
    DECODE_ERROR,
    DECOMPRESSION_BOMB,
    IMAGE_TOO_SMALL,
    MISSING_IMAGE,
    decode_rgb,
)
from vlmray.data.tokenize import Tokenizer

# Reasons a row is rejected at ingest (the values of the reject_reason column); the image
# reasons are curation's image stage's own.
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
REASONS = (MISSING_IMAGE, DECODE_ERROR, DECOMPRESSION_BOMB, IMAGE_TOO_SMALL, MISSING_TEXT,
           EMPTY_TEXT, TEXT_TOO_LONG)


@dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    image_size: int
    min_image_side: int = 16
    max_text_chars: int = 1000
    regions: int = 0
    """K > 0: also emit REGION_BOXES (K, 4), REGION_SPANS (K, L), REGION_MASK (K,) from the
    sidecar's ``boxes`` / ``phrases`` (``data.regions``); 0: no region columns."""
    texts_aug: int = 0
    """T > 0: also emit TOKENS_AUG / TOKEN_MASK_AUG (T, L): the caption then its rewrites
    (``texts_aug``; ``data.extra_texts``), see :func:`extra_text_columns`; 0: none."""
    synthetic_caption: bool = False
    """Also emit SYNTHETIC_TOKENS / SYNTHETIC_TOKEN_MASK (L,) (``synthetic_caption``)."""
    max_pixels: int = ImageConfig.max_pixels
    """Decompression-bomb guard (curation's ``image.max_pixels`` default): an image whose
    header declares more pixels is rejected (``decompression_bomb``) before it is decoded."""


Crop = tuple[float, float, float, float]
"""(x0, y0, x1, y1): the window of the source image a decoded image keeps, as fractions."""


def decode_image(data: bytes | None, spec: DecodeSpec) -> tuple[np.ndarray | None, str]:
    """Encoded bytes -> uint8 (3, S, S) (shorter side resized, centre-cropped), or a reason."""
    img, reason, _ = _decode(data, spec)
    return img, reason


def _decode(data: bytes | None, spec: DecodeSpec) -> tuple[np.ndarray | None, str, Crop | None]:
    """(pixels or None, reason, the crop window of the decoded image in its own normalised
    coordinates: (x0, y0, x1, y1), what boxes are mapped through)."""
    if not data:
        return None, MISSING_IMAGE, None
    dec, reason = decode_rgb(data, max_pixels=spec.max_pixels)   # full size: no JPEG draft
    if dec is None:
        return None, reason, None
    img = dec.image
    if min(img.size) < spec.min_image_side:
        return None, IMAGE_TOO_SMALL, None
    pixels, crop = _resize_crop(img, spec.image_size)
    return pixels, "", crop


def _resize_crop(img: Image.Image, size: int) -> tuple[np.ndarray, Crop]:
    """uint8 (3, S, S) and the kept window (x0, y0, x1, y1) as fractions of the resized image."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    crop = (left / nw, top / nh, (left + size) / nw, (top + size) / nh)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy(), crop  # (3, S, S)


def check_text(text: str | None, spec: DecodeSpec) -> str:
    if text is None:
        return MISSING_TEXT
    if not text.strip():
        return EMPTY_TEXT
    if len(text) > spec.max_text_chars:
        return TEXT_TOO_LONG
    return ""


def _as_str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def label_of(meta: object) -> int:
    """The integer ``label`` of a JSON sidecar, or -1 when absent or unreadable."""
    try:
        value = json.loads(_as_str(meta) or "{}").get("label", -1)
        return int(value) if value is not None else -1
    except (ValueError, TypeError, AttributeError):
        return -1


def prepare_rows(keys: Sequence[str], images: Sequence[bytes | None], texts: Sequence[object],
                 metas: Sequence[object], spec: DecodeSpec, tokenizer: Tokenizer, *,
                 texts_aug: Sequence[object] | None = None,
                 synthetic: Sequence[object] | None = None) -> dict[str, np.ndarray]:
    """Raw columns -> a batch with PIXELS, TOKENS, TOKEN_MASK, LABEL, TEXT, KEY, REJECT_REASON,
    with ``spec.regions = K > 0`` REGION_BOXES, REGION_SPANS, REGION_MASK
    (:func:`vlmray.data.regions.region_columns`), and the extra-text token columns
    ``spec.texts_aug`` / ``spec.synthetic_caption`` ask for (:func:`extra_text_columns`; the
    ``texts_aug`` / ``synthetic`` columns of an ingest prefix, else the sidecars).

    Rejected rows keep their key, text and reason; their pixels (and region columns) are zeros.
    """
    n, s = len(keys), spec.image_size
    pixels = np.zeros((n, 3, s, s), dtype=np.uint8)
    reasons, clean_texts, crops = [], [], []
    for i in range(n):
        text = _as_str(texts[i])
        reason = check_text(text, spec)
        img, img_reason, crop = _decode(images[i], spec)
        reason = img_reason or reason
        if img is not None:
            pixels[i] = img
        reasons.append(reason)
        clean_texts.append(text or "")
        crops.append(crop)
    ids, mask = tokenizer([t if not r else "" for t, r in zip(clean_texts, reasons)])
    out = {
        schema.KEY: np.asarray([str(k) for k in keys], dtype=object),
        schema.TEXT: np.asarray(clean_texts, dtype=object),
        schema.LABEL: np.asarray([label_of(m) for m in metas], dtype=np.int64),
        schema.PIXELS: pixels,
        schema.TOKENS: ids,
        schema.TOKEN_MASK: mask,
        schema.REJECT_REASON: np.asarray(reasons, dtype=object),
    }
    if spec.regions > 0:
        from vlmray.data.regions import region_columns

        kept = [c if not r else None for c, r in zip(crops, reasons)]
        out.update(region_columns(metas, kept, ids, mask, spec.regions, tokenizer))
    if spec.texts_aug > 0 or spec.synthetic_caption:
        out.update(extra_text_columns(clean_texts, reasons, metas, spec, tokenizer,
                                      texts_aug=texts_aug, synthetic=synthetic))
    return out


def _sidecar(meta: object) -> dict:
    """A JSON sidecar as a dict ({} when absent, unreadable or not an object)."""
    try:
        doc = json.loads(_as_str(meta) or "{}")
    except (ValueError, TypeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _text_list(value: object) -> list[str]:
    """A ``texts_aug`` value (list, NumPy array, None) -> list of str (None entries -> "")."""
    if value is None or isinstance(value, (str, bytes)):
        return []
    return [_as_str(v) or "" for v in value]


def _extra_texts(i: int, meta_doc: dict | None, texts_aug: Sequence[object] | None,
                 synthetic: Sequence[object] | None) -> tuple[list[str], str]:
    """Row ``i``'s rewrites (``texts_aug[1:]``) and synthetic caption: from the prefix's
    columns when given, else from its sidecar (``meta_doc``)."""
    doc = meta_doc or {}
    aug = _text_list(texts_aug[i] if texts_aug is not None else doc.get(schema.TEXTS_AUG))
    syn = synthetic[i] if synthetic is not None else doc.get(schema.SYNTHETIC_CAPTION)
    return aug[1:], (_as_str(syn) or "") if isinstance(syn, (str, bytes)) else ""


def extra_text_columns(texts: Sequence[str], reasons: Sequence[str], metas: Sequence[object],
                       spec: DecodeSpec, tokenizer: Tokenizer, *,
                       texts_aug: Sequence[object] | None = None,
                       synthetic: Sequence[object] | None = None) -> dict[str, np.ndarray]:
    """Rewritten and synthetic captions, tokenised like TOKENS (same tokenizer, length L).

    ``spec.texts_aug = T > 0``: TOKENS_AUG / TOKEN_MASK_AUG int64 (B, T, L). Slot 0 is the row's
    own caption (so it equals TOKENS), slots 1.. its rewrites (``texts_aug[1:]``, whose first
    entry is the original by contract) in order; rewrites beyond T - 1 are dropped, missing
    ones and empty strings leave all-zero rows (empty slots, never drawn). A row without
    ``texts_aug`` has only slot 0.
    ``spec.synthetic_caption``: SYNTHETIC_TOKENS / SYNTHETIC_TOKEN_MASK int64 (B, L); a row
    without a (non-empty) ``synthetic_caption`` gets its own caption (not counted as a fallback).
    Values come from ``texts_aug`` / ``synthetic`` (per-row column values of the ingest prefix)
    when given, else from each sidecar's keys of the same names. Rejected rows: all zeros.
    """
    n, t, length = len(texts), spec.texts_aug, tokenizer.context_length
    from_columns = texts_aug is not None and synthetic is not None
    pairs = [_extra_texts(i, None if from_columns else _sidecar(metas[i]), texts_aug, synthetic)
             for i in range(n)]
    rewrites, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    out: dict[str, np.ndarray] = {}
    kept = [not r for r in reasons]
    if t > 0:
        ids = np.zeros((n, t, length), dtype=np.int64)
        mask = np.zeros((n, t, length), dtype=np.int64)
        for slot in range(t):
            slot_texts = [texts[i] if slot == 0 else
                          (rewrites[i][slot - 1] if slot - 1 < len(rewrites[i]) else "")
                          for i in range(n)]
            live = np.asarray([k and bool(s.strip()) for k, s in zip(kept, slot_texts)], bool)
            if live.any():
                i_s, m_s = tokenizer([s for s, ok in zip(slot_texts, live) if ok])
                ids[live, slot], mask[live, slot] = i_s, m_s
        out[schema.TOKENS_AUG], out[schema.TOKEN_MASK_AUG] = ids, mask
    if spec.synthetic_caption:
        chosen = [(c if c.strip() else texts[i]) if kept[i] else "" for i, c in
                  enumerate(captions)]
        ids, mask = tokenizer(chosen)
        ids[~np.asarray(kept, bool)] = 0
        mask[~np.asarray(kept, bool)] = 0
        out[schema.SYNTHETIC_TOKENS], out[schema.SYNTHETIC_TOKEN_MASK] = ids, mask
    return out


__all__ = ["DECODE_ERROR", "DECOMPRESSION_BOMB", "REASONS", "DecodeSpec", "decode_image",
           "extra_text_columns", "label_of", "prepare_rows"]
