"""Content signatures for deduplication: exact hashes, a 64-bit perceptual hash, captions.

    phash(Image.open(path))            # int64; near-duplicate images differ in few bits
    hamming(a, b)                      # bit distance between phash arrays
    text_signature("A  Photo of a DOG!")  == text_signature("a photo of a dog")
    text_signature("3 red circles")       != text_signature("2 red circles")
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata

import numpy as np
from PIL import Image

from vlmray.config.curation import CAPTION_NORMALISERS

_HASH_SIDE = 32          # the image is reduced to 32x32 grey before the DCT
_LOW = 8                 # the top-left 8x8 (lowest) frequencies make the 64 bits


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: ``dct(x) = M @ x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (signed int64): bit = low-frequency coefficient > median."""
    grey = image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.BILINEAR)
    x = np.asarray(grey, dtype=np.float64)
    m = _dct_matrix(_HASH_SIDE)
    low = (m @ x @ m.T)[:_LOW, :_LOW].ravel()
    bits = low > np.median(low)
    packed = np.packbits(bits.astype(np.uint8))           # 8 bytes, big-endian bit order
    return int(packed.view(">u8")[0].astype(np.uint64).view(np.int64))


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bit distance between int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(x.view(np.uint64) if x.ndim else x.astype(np.uint64)).astype(np.int64)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_SPACE = re.compile(r"\s+")
_DIGITS = re.compile(r"\d+")
# a number with its sign, decimal/thousands/time/fraction separators: "-5", "3.5", "10:30"
_NUMBER = re.compile(r"((?<![\w.,:/])[-+\u2212]?\d+(?:[.,:/]\d+)*)")
_KEPT_PUNCTUATION = "%\u2030#&@"            # they change meaning: "50%", "#1", "r&b"


@functools.cache
def _punctuation_to_space() -> dict[int, str]:
    """``str.translate`` table: every Unicode punctuation character (category P*) but
    :data:`_KEPT_PUNCTUATION` -> a space."""
    return {cp: " " for cp in range(sys.maxunicode + 1)
            if unicodedata.category(chr(cp))[0] == "P" and chr(cp) not in _KEPT_PUNCTUATION}


def normalise_caption(text: str, mode: str = "presentation") -> str:
    """The form of a caption that caption deduplication compares (``dedup.caption_normaliser``).

    ``presentation`` (default): only presentation goes: Unicode compatibility forms (NFKC:
    full-width letters, ligatures), case, punctuation (but the signs and separators inside
    numbers, and ``%``, ``#``, ``&``, ``@``) and runs of whitespace. Every word stays, so
    captions that differ in a number, a count word, a negation or a colour stay different:
    ``"3 red circles."`` and ``"2 red circles"`` differ, ``"A  Red circle!"`` and
    ``"a red circle"`` are the same. ``exact``: the text itself (NFC, whitespace collapsed;
    case and punctuation count). ``digits``: ``presentation``, then every digit run -> ``0``
    (``"photo 16"`` == ``"photo 0"``: numbered boilerplate merges, and so do real counts).
    """
    if mode not in CAPTION_NORMALISERS:
        raise ValueError(f"caption normaliser {mode!r}; valid: {', '.join(CAPTION_NORMALISERS)}")
    if mode == "exact":
        return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    parts = _NUMBER.split(unicodedata.normalize("NFKC", text).casefold())
    table = _punctuation_to_space()
    text = "".join(p.replace("\u2212", "-") if i % 2 else p.translate(table)
                   for i, p in enumerate(parts))
    if mode == "digits":
        text = _DIGITS.sub("0", text)
    return _SPACE.sub(" ", text).strip()


def text_signature(text: str, mode: str = "presentation") -> str:
    """A short hex digest of :func:`normalise_caption` (equal for captions that differ only
    in presentation, under ``mode``)."""
    return hashlib.blake2b(normalise_caption(text, mode).encode("utf-8"),
                           digest_size=8).hexdigest()


__all__ = ["CAPTION_NORMALISERS", "hamming", "normalise_caption", "phash", "sha256_hex",
           "text_signature"]
