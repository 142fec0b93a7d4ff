"""Content signatures for deduplication: exact hashes, a 64-bit perceptual hash, captions.

    phash(Image.open(path))            # int64; near-duplicate images differ in few bits
    hamming(a, b)                      # bit distance between phash arrays
    text_signature("A  Photo of a DOG!")  == text_signature("a photo of a dog")
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

import numpy as np
from PIL import Image

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


_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """Lower case, NFKC, punctuation dropped, digit runs -> ``0``, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _DIGITS.sub("0", _PUNCT.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def text_signature(text: str) -> str:
    """A short hex digest of :func:`normalise_caption` (equal for trivially different text)."""
    return hashlib.blake2b(normalise_caption(text).encode("utf-8"), digest_size=8).hexdigest()


__all__ = ["hamming", "normalise_caption", "phash", "sha256_hex", "text_signature"]
