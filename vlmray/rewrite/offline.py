"""A model-free, deterministic paraphraser: La-CLIP's EDA-style baseline as a rewrite backend.

La-CLIP (Fan et al., 2023, Table 7) compares LLM rewrites with EDA (Wei & Zou, 2019): synonym
replacement, random swap/insertion/deletion. Ours keeps every visual fact instead of deleting
or inserting words: (1) synonyms from a small table (sizes, counts, positions,
"photo/picture/image", a few verbs; colour and shape names are kept, at most rephrased as
"red coloured" / "circle shape"), (2) word order (the position phrase moves to the front, "a
photo of X" becomes "X, in a photo"), (3) attribute phrasing ("two small red circles" ->
"two circles that are small and red"). A caption none of these touch gets EDA's random swap of
two words. Each rewrite is seeded by ``(sampling.seed, key, slot)``: the same row gives the
same rewrites on any worker. Token counts are the rewrite's words.

    ds = OfflineBackend(RewriteConfig(k=2)).apply(ds, prompts)   # + _rewrite_0, ... columns
    paraphrase("a small red circle on the left", seed=0, key="k", slot=0)
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from vlmray.data import schema
from vlmray.rewrite.base import (
    PromptBuilder,
    RewriteBackend,
    raw_column,
    register_backend,
    tokens_column,
)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "white", "black", "grey", "gray",
            "orange", "pink", "brown")
_SHAPES = ("circle", "square", "triangle", "cross")
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("little", "small-sized"), "little": ("small", "tiny"), "tiny": ("very small",),
    "large": ("big", "large-sized"), "big": ("large",),
    "one": ("a single", "1"), "a single": ("one",), "1": ("one",),
    "two": ("2", "a pair of"), "2": ("two",), "a pair of": ("two",),
    "three": ("3",), "3": ("three",),
    "photo": ("picture", "image"), "picture": ("photo", "image"), "image": ("picture", "photo"),
    "photograph": ("photo",), "showing": ("with", "depicting"), "depicting": ("showing",),
    "on the left": ("on the left side", "to the left"), "on the left side": ("on the left",),
    "on the right": ("on the right side", "to the right"), "on the right side": ("on the right",),
    "near the top": ("at the top", "close to the top"), "at the top": ("near the top",),
    "near the bottom": ("at the bottom", "close to the bottom"),
    "at the bottom": ("near the bottom",),
    "in the centre": ("in the middle", "at the center"), "in the middle": ("in the centre",),
    "plain": ("simple",), "background": ("backdrop",), "sitting": ("seated",),
    **{c: (f"{c} coloured",) for c in _COLOURS},
    **{s: (f"{s} shape",) for s in _SHAPES},
}
_PHRASES = sorted(_SYNONYMS, key=len, reverse=True)          # longest first
_SYN_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in _PHRASES) + r")\b", re.I)
_POSITION = re.compile(
    r"\s+((?:on|at|near|in|to|close to)\s+the\s+(?:left|right|top|bottom|centre|center|middle)"
    r"(?:\s+(?:side|part))?(?:\s+of\s+the\s+(?:picture|image|photo))?)\s*$", re.I)
_PHOTO_OF = re.compile(r"^(?:an?\s+)?(photo|picture|image|photograph)\s+of\s+(.+)$", re.I)
_SIZES = "small|little|tiny|large|big"
_ATTR = re.compile(
    rf"\b(an?|one|two|three|[123]|a single|a pair of)\s+(?:({_SIZES})\s+)?"
    rf"({'|'.join(_COLOURS)})(\s+coloured)?\s+(?!coloured\b)(\w+(?:\s+shape)?)\b", re.I)
_PLURAL_COUNTS = ("two", "three", "2", "3", "a pair of")
_ARTICLE = re.compile(r"\b(a|an)\s+(\w)", re.I)


def _rng(seed: int, key: str, slot: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), slot])


def synonyms(text: str, rng: np.random.Generator, p: float = 0.6) -> str:
    """Each table phrase replaced by one of its synonyms with probability ``p``."""
    def swap(m: re.Match[str]) -> str:
        options = _SYNONYMS[m.group(0).lower()]
        return options[int(rng.integers(len(options)))] if rng.random() < p else m.group(0)
    return _SYN_RE.sub(swap, text)


def reorder(text: str) -> str:
    """A trailing position phrase moves to the front; else "a photo of X" -> "X, in a photo"."""
    m = _POSITION.search(text)
    if m and m.start() > 0:
        return f"{m.group(1)}, {text[:m.start()]}"
    m = _PHOTO_OF.match(text)
    if m:
        return f"{m.group(2)}, in a {m.group(1).lower()}"
    return text


def attribute(text: str) -> str:
    """"<count> [size] <colour> <noun>" -> "<count> <noun> that is/are [size and] <colour>"."""
    def phrase(m: re.Match[str]) -> str:
        count, size, colour, coloured, noun = m.groups()
        verb = "are" if count.lower() in _PLURAL_COUNTS else "is"
        colour += coloured or ""
        attrs = f"{size} and {colour}" if size else colour
        return f"{count} {noun} that {verb} {attrs}"
    return _ATTR.sub(phrase, text, count=1)


def _swap_two(words: list[str], rng: np.random.Generator) -> list[str]:
    if len(words) < 2:
        return words
    i, j = rng.choice(len(words), size=2, replace=False)
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return words


def _articles(text: str) -> str:
    """"a"/"an" agreeing with the next word's first letter (after synonyms changed it)."""
    def fix(m: re.Match[str]) -> str:
        art = "an" if m.group(2).lower() in "aeiou" else "a"
        return (art.capitalize() if m.group(1)[0].isupper() else art) + " " + m.group(2)
    return _ARTICLE.sub(fix, text)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def paraphrase(caption: str, *, seed: int, key: str, slot: int) -> str:
    """A meaning-preserving rewrite of ``caption``, the same for the same (seed, key, slot)."""
    text = " ".join(caption.split())
    if not text:
        return ""
    rng = _rng(seed, key, slot)
    period, upper = text.endswith("."), text[0].isupper()
    body = text.rstrip(".").strip()
    body = body[:1].lower() + body[1:] if upper and not body[1:2].isupper() else body
    ops = [attribute, reorder, lambda t: synonyms(t, rng)]
    for k in rng.permutation(len(ops)):
        if rng.random() < 0.6:
            body = ops[k](body)
    for op in (lambda t: synonyms(t, rng, 1.0), attribute, reorder):
        if _norm(body) != _norm(text):
            break
        body = op(body)
    if _norm(body) == _norm(text):
        body = " ".join(_swap_two(body.split(), rng))              # EDA's random swap
    body = _articles(" ".join(body.split()))
    body = (body[:1].upper() + body[1:]) if upper else body
    return body + ("." if period else "")


def paraphrase_batch(batch: dict[str, np.ndarray], *, k: int, seed: int) -> dict[str, np.ndarray]:
    """``map_batches`` function: ``raw_column(j)`` / ``tokens_column(j)`` for ``j < k``."""
    keys = [str(x) for x in batch[schema.KEY]]
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
             for t in batch[schema.TEXT]]
    for j in range(k):
        out = [paraphrase(t, seed=seed, key=key, slot=j) for t, key in zip(texts, keys)]
        batch[raw_column(j)] = np.array(out, dtype=object)
        batch[tokens_column(j)] = np.array([len(o.split()) for o in out], dtype=np.int64)
    return batch


@register_backend("offline")
class OfflineBackend(RewriteBackend):
    """Deterministic EDA-style paraphrases in Ray Data tasks (no model, no actors)."""

    def apply(self, ds, prompts: PromptBuilder):
        return ds.map_batches(paraphrase_batch, batch_format="numpy",
                              batch_size=max(self.cfg.batch_size, 64),
                              fn_kwargs={"k": self.cfg.k, "seed": self.cfg.sampling.seed})


__all__ = ["OfflineBackend", "attribute", "paraphrase", "paraphrase_batch", "reorder",
           "synonyms"]
