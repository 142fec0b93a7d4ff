"""The operations behind ``ViewStage`` (``vlmray.data.views``): pure NumPy/PIL, no Ray, no torch.

Every function takes a ``numpy.random.Generator`` and never touches global random state.

    image:  random_resized_crops, random_flips, colour_jitter   uint8 (B, 3, S, S) in and out
    text:   eda, summary, attributes                            str -> str
    tokens: mlm_mask                                            int64 (B, L) -> (ids, labels)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = -100
"""MLM label of positions that were not masked (``torch.nn.functional.cross_entropy``'s)."""
_RATIO = (3 / 4, 4 / 3)
_ATTEMPTS = 10
_JITTER_CHUNK = 16
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)   # ITU-R 601 luma, as torchvision


# --- image views ---------------------------------------------------------------------------


def sample_crop_boxes(rng: np.random.Generator, n: int, size: int,
                      scale: tuple[float, float]) -> np.ndarray:
    """``n`` boxes (top, left, h, w) in a square ``size`` image, drawn as torchvision's
    ``RandomResizedCrop.get_params``: area fraction ~ U(scale), log aspect ratio ~
    U(log 3/4, log 4/3), up to 10 tries for a box that fits, else the whole image (the
    fallback for a square image). Vectorised over rows and tries. -> int64 (n, 4)."""
    area = size * size * rng.uniform(scale[0], scale[1], (n, _ATTEMPTS))
    ratio = np.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), (n, _ATTEMPTS)))
    w = np.rint(np.sqrt(area * ratio)).astype(np.int64)                     # (n, tries)
    h = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.argmax(1)                                                   # (n,)
    rows = np.arange(n)
    ok = fits[rows, first]
    w = np.where(ok, w[rows, first], size)
    h = np.where(ok, h[rows, first], size)
    top = rng.integers(0, size - h + 1)
    left = rng.integers(0, size - w + 1)
    return np.stack([top, left, h, w], axis=1)


def crop_resize(pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each image's box, resized (bilinear, antialiased) back to the full side.
    (B, 3, S, S) uint8, (B, 4) -> (B, 3, S, S) uint8."""
    size = pixels.shape[-1]
    out = np.empty_like(pixels)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        img = Image.fromarray(np.ascontiguousarray(pixels[i].transpose(1, 2, 0)))
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


def random_resized_crops(pixels: np.ndarray, rng: np.random.Generator,
                         scale: tuple[float, float]) -> np.ndarray:
    """(B, 3, S, S) uint8 -> one random resized crop of each image, same shape."""
    return crop_resize(pixels, sample_crop_boxes(rng, len(pixels), pixels.shape[-1], scale))


def random_flips(pixels: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Each image mirrored left-right with probability ``p``. (B, 3, S, S) -> same."""
    flip = rng.random(len(pixels)) < p                                       # (B,)
    out = pixels.copy()
    out[flip] = pixels[flip][..., ::-1]
    return out


def colour_jitter(pixels: np.ndarray, rng: np.random.Generator,
                  strength: float = 0.4) -> np.ndarray:
    """torchvision ``ColorJitter(brightness=s, contrast=s, saturation=s)``, vectorised over
    the batch: factors ~ U(1 - s, 1 + s) per image, applied in the fixed order brightness ->
    contrast -> saturation (torchvision shuffles the order), clamped to [0, 255] after each.
    (B, 3, S, S) uint8 -> same. In-place float32 arithmetic on chunks that stay in cache."""
    f = rng.uniform(1 - strength, 1 + strength, (3, len(pixels), 1, 1, 1)).astype(np.float32)
    out = np.empty_like(pixels)
    for i in range(0, len(pixels), _JITTER_CHUNK):
        rows = slice(i, i + _JITTER_CHUNK)
        out[rows] = _jitter(pixels[rows], f[:, rows])
    return out


def _jitter(pixels: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(b, 3, S, S) uint8 and factors (3, b, 1, 1, 1) -> jittered (b, 3, S, S) uint8."""
    x = pixels.astype(np.float32)
    x *= f[0]                                                                # brightness
    np.clip(x, 0, 255, out=x)
    mean = _grey(x).mean((1, 2))[:, None, None, None]                        # (b, 1, 1, 1)
    x *= f[1]                                                                # contrast
    x += (1 - f[1]) * mean
    np.clip(x, 0, 255, out=x)
    grey = _grey(x)[:, None]                                                 # (b, 1, S, S)
    x *= f[2]                                                                # saturation
    grey *= 1 - f[2]
    x += grey
    np.clip(x, 0, 255, out=x)
    return np.rint(x, out=x).astype(np.uint8)


def _grey(x: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) float32 -> (B, S, S) luma."""
    grey = x[:, 0] * _GREY[0]
    grey += x[:, 1] * _GREY[1]
    grey += x[:, 2] * _GREY[2]
    return grey


# --- text views ----------------------------------------------------------------------------

_CLAUSE = re.compile(r"[,;.:]|\swith\s", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SUMMARY_WORDS = 8
STOP_WORDS = frozenset("""
    a an the this that these those there here it its is are was were be been being has have
    had of in on at to into onto over under near by for from with without and or but as than
    then so some any each every all both either neither no not very just also
    photo picture image showing shows shown
""".split())
"""Words ``attributes`` drops: articles, auxiliaries, prepositions, conjunctions, and the
caption fillers ``photo``/``picture``/``image``/``showing``. Position words are kept."""
NUMBER_WORDS = frozenset("""
    zero one two three four five six seven eight nine ten eleven twelve twenty hundred
    single pair couple dozen several many few
""".split())


def eda(text: str, p: float, rng: np.random.Generator) -> str:
    """EDA (Wei & Zou, 2019) without synonym lists: each word is deleted with probability p
    (one random word survives if all would go), then each position is swapped with a random
    one with probability p, then for each word with probability p a word of the caption is
    inserted at a random place. Never empty unless ``text`` is blank."""
    words = text.split()
    if not words:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    edited = [w for w, k in zip(words, keep) if k]
    n = len(edited)
    for i in np.flatnonzero(rng.random(n) < p).tolist():
        j = int(rng.integers(n))
        edited[i], edited[j] = edited[j], edited[i]
    for _ in range(int((rng.random(len(words)) < p).sum())):
        edited.insert(int(rng.integers(len(edited) + 1)), words[int(rng.integers(len(words)))])
    return " ".join(edited)


def summary(text: str) -> str:
    """The caption's first clause: the text before the first ``, ; . :`` or `` with ``, at most
    8 words; the first 8 words when that clause is empty."""
    for clause in _CLAUSE.split(text):
        words = clause.split()
        if words:
            return " ".join(words[:SUMMARY_WORDS])
    return " ".join(text.split()[:SUMMARY_WORDS]) or text


def attributes(text: str) -> str:
    """The caption's content words, lower-cased, in order: stop words, numbers and number
    words dropped; the caption itself when nothing is left."""
    kept = [w for w in _WORD.findall(text.lower())
            if w not in STOP_WORDS and w not in NUMBER_WORDS and not any(c.isdigit() for c in w)]
    return " ".join(kept) or text


TEXT_VIEWS = {"summary": summary, "attributes": attributes}


# --- masked language modelling -------------------------------------------------------------


def mlm_mask(tokens: np.ndarray, mask: np.ndarray, prob: float, rng: np.random.Generator, *,
             mask_id: int, special_ids: Sequence[int],
             vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking (Devlin et al., 2019): each real, non-special token is chosen with
    probability ``prob`` (at least one per row that has any); a chosen token becomes
    ``mask_id`` (80%), a random non-special id (10%) or stays (10%).
    (B, L) ids and mask -> (ids, labels) int64 (B, L); labels = original id where chosen,
    ``IGNORE_INDEX`` elsewhere."""
    maskable = (mask == 1) & ~np.isin(tokens, np.asarray(special_ids))        # (B, L)
    chosen = (rng.random(tokens.shape) < prob) & maskable
    short = np.flatnonzero(maskable.any(1) & ~chosen.any(1))                  # rows with none
    if len(short):
        score = np.where(maskable[short], rng.random((len(short), tokens.shape[1])), -1.0)
        chosen[short, score.argmax(1)] = True
    u = rng.random(tokens.shape)
    ids = tokens.astype(np.int64, copy=True)
    ids[chosen & (u < 0.8)] = mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    words = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))     # non-special ids
    ids[swap] = words[rng.integers(0, len(words), int(swap.sum()))]
    labels = np.where(chosen, tokens, IGNORE_INDEX).astype(np.int64)
    return ids, labels


__all__ = ["IGNORE_INDEX", "NUMBER_WORDS", "STOP_WORDS", "TEXT_VIEWS", "attributes",
           "colour_jitter", "crop_resize", "eda", "mlm_mask", "random_flips",
           "random_resized_crops", "sample_crop_boxes", "summary"]
