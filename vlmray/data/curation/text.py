"""Caption cleaning and filtering: decode, strip HTML, normalise whitespace, reject junk.

Each live row's caption (UTF-8 bytes, str or None) is decoded strictly, cleaned (HTML entities
and tags, Unicode whitespace and control characters, runs of spaces) and checked in order:
missing, not UTF-8, empty, too short, too long, junk alt-text, wrong script, too few letters.
Kept rows get the clean caption in ``TEXT`` and its :func:`text_signature` in ``TEXT_SIG``
(under ``dedup.caption_normaliser``, which the plan hands in: captions differing only in case,
punctuation or whitespace share a signature; any other word makes a different one).

    batch = TextStage(TextConfig(scripts=["latin", "cyrillic"]))(batch)
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from vlmray.config.curation import SCRIPT_GROUPS, TextConfig
from vlmray.data import schema
from vlmray.data.curation.hashing import text_signature
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput

# Reject reasons (values of the reject_reason column).
MISSING_TEXT = "missing_text"
TEXT_NOT_UTF8 = "text_not_utf8"
EMPTY_TEXT = "empty_text"
TEXT_TOO_SHORT = "text_too_short"
TEXT_TOO_LONG = "text_too_long"
JUNK_ALT_TEXT = "junk_alt_text"
WRONG_LANGUAGE = "wrong_language"
TOO_FEW_LETTERS = "too_few_letters"
REASONS = (MISSING_TEXT, TEXT_NOT_UTF8, EMPTY_TEXT, TEXT_TOO_SHORT, TEXT_TOO_LONG, JUNK_ALT_TEXT,
           WRONG_LANGUAGE, TOO_FEW_LETTERS)

# Repairs (entries of the repairs column).
HTML_STRIPPED = "html_stripped"
WHITESPACE_NORMALISED = "whitespace_normalised"
REPAIRS = (HTML_STRIPPED, WHITESPACE_NORMALISED)

RAW_LENGTH_FACTOR = 4
"""Raw captions longer than this many times ``max_chars`` are rejected before any cleaning."""

# Unicode scripts by the first word of a letter's name (``unicodedata.name``), lower case, plus
# a few language groups that span several of them.
# --- cleaning ----------------------------------------------------------------------------------

_TAG = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->|</?[a-z!?][^<>]*>",
                  re.IGNORECASE | re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")          # C0/C1 controls -> space
_INVISIBLE = re.compile("[\u00ad\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064"
                        "\u2066-\u2069\ufeff]")          # soft hyphen, zero-width, bidi -> ""
_SURROGATE = re.compile("[\ud800-\udfff]")
_ASCII_CONTROLS = bytes(range(32)) + b"\x7f"


def _printable(text: str) -> bool:
    """``str.isprintable`` (False for any whitespace but " "), twice as fast on ASCII."""
    if text.isascii():
        raw = text.encode("ascii")
        return len(raw.translate(None, _ASCII_CONTROLS)) == len(raw)
    return text.isprintable()


def _strip_html(text: str) -> str:
    """Tags out (as a space), entities unescaped; twice for double-escaped markup."""
    text = html.unescape(_TAG.sub(" ", text))
    return _TAG.sub(" ", text) if "<" in text else text


def _needs_whitespace_fix(text: str) -> bool:
    if not _printable(text):            # any whitespace but " ", controls, invisibles
        return True
    return "  " in text or text[:1] == " " or text[-1:] == " "


def _normalise_whitespace(text: str) -> str:
    if not _printable(text):
        text = _INVISIBLE.sub("", _CONTROL.sub(" ", text))
    return " ".join(text.split())


def _decode(value: Any) -> tuple[str | None, str]:
    """(text, reason): UTF-8 bytes decoded strictly; None (or a non-text value) is missing."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            return None, TEXT_NOT_UTF8
        return value, ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8"), ""
        except UnicodeDecodeError:
            return None, TEXT_NOT_UTF8
    return None, MISSING_TEXT


# --- junk alt-text -----------------------------------------------------------------------------

_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|ico|raw|cr2|nef|dng)"
_GENERIC = (
    "image", "images", "img", "photo", "photos", "photograph", "picture", "pictures", "pic",
    "pics", "thumbnail", "thumb", "icon", "logo", "banner", "avatar", "placeholder", "untitled",
    "no title", "untitled design", "default", "spacer", "blank", "null", "none", "undefined",
    "nan", "n/a", "na", "alt", "alt text", "title", "caption", "description", "no description",
    "no description available", "no caption", "no alt text", "click here", "click to enlarge",
    "click to zoom", "click for more", "read more", "learn more", "more info", "see more",
    "view more", "view larger", "view image", "zoom", "enlarge", "download", "download now",
    "free download", "buy now", "shop now", "order now", "add to cart", "image not found",
    "image not available", "no image", "no image available", "image unavailable",
    "image coming soon", "coming soon", "photo coming soon", "loading", "test", "test image",
    "sample image", "stock photo", "stock image", "featured image", "product image",
    "main image", "header image", "hero image", "cover image", "screenshot", "screen shot",
    "share", "facebook", "twitter", "instagram", "pinterest", "linkedin", "youtube", "whatsapp",
    "email", "e-mail", "print", "home", "next", "previous", "prev", "back", "close", "menu",
    "search", "play", "play video", "video", "gallery", "slide", "slideshow", "link", "button",
    "here", "this", "unknown", "object object", "image of", "photo of", "picture of",
    "a photo of", "an image of", "a picture of", "image description", "image title",
)
_SEP = r"[\s_\-]+"
_JUNK_PARTS = (
    # generic words, optionally numbered: "image", "Photo 3", "slide (2)"
    "(?:" + "|".join(re.escape(w).replace(r"\ ", _SEP) for w in _GENERIC) + r")[\W\d_]*",
    rf"[^\s/\\]+\.{_EXT}",                                   # IMG_4821.jpg, 000186a0.png
    r"(?:img|dsc[nf]?|dcim|pict?|pxl|mvimg|vid|wp|gopr|sam|p\d{3})[\W_]*\d{3,}[\w\-]*",
    rf"screen[\s_\-]?shot[\W\d_]*(?:at[\W\d_]*)?(?:[ap]\.?m\.?)?[\W\d_]*(?:\.{_EXT})?",
    r"(?=[^\d\s]*\d)[0-9a-f]{8,}",                            # hex ids: 3f2a9c1b
    r"(?=[^\s]*\d)(?=[^\s]*[a-z])[a-z0-9_\-]{10,}",           # slugs / ids mixing digits
    r"(?:(?:https?|ftp)://|www\.)\S+",                        # bare URLs
    r"[\w\-]+(?:\.[\w\-]+)*\.(?:com|net|org|io|co|info|biz|edu|gov|uk|de|fr|ru|jp|cn)(?:/\S*)?",
    r"\S+@\S+\.\w+",                                          # e-mail addresses
    r"lorem ipsum.*",
    r"\{\{.*\}\}|\$\{.*\}|%[sd]|\{\w*\}|\[object object\]",   # unfilled template fields
)
_JUNK = re.compile(r"[\W_]*(?:" + "|".join(_JUNK_PARTS) + r")[\W_]*", re.IGNORECASE)


# --- script and letter statistics --------------------------------------------------------------

_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_SCRIPT_OF: dict[str, str] = {}


def _script(ch: str) -> str:
    """First word of the character's Unicode name (``LATIN``, ``CJK``...), cached."""
    script = _SCRIPT_OF.get(ch)
    if script is None:
        words = unicodedata.name(ch, "").split()
        if len(words) > 1 and words[0] in ("FULLWIDTH", "HALFWIDTH"):
            words = words[1:]
        script = _SCRIPT_OF[ch] = words[0] if words else ""
    return script


def letter_stats(text: str, allowed: frozenset[str]) -> tuple[int, int, int, int]:
    """(non-space chars, letters incl. combining marks, alphabetic letters, those in
    ``allowed`` scripts) of a whitespace-normalised text."""
    if text.isascii():                                    # the common case, in C
        raw = text.encode("ascii")
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        return len(raw) - raw.count(b" "), letters, letters, letters if "LATIN" in allowed else 0
    nonspace = letters = alpha = in_script = 0
    for ch, k in Counter(text).items():
        if ch == " ":
            continue
        nonspace += k
        if ch.isalpha():
            letters, alpha = letters + k, alpha + k
            in_script += k if _script(ch) in allowed else 0
        elif unicodedata.category(ch)[0] == "M":
            letters += k
    return nonspace, letters, alpha, in_script


def allowed_scripts(scripts: list[str]) -> frozenset[str]:
    """Config script names -> the upper-case first words of Unicode letter names."""
    out: set[str] = set()
    for s in scripts:
        out.update(SCRIPT_GROUPS.get(s.lower(), (s.upper(),)))
    return frozenset(out)


# --- the stage ---------------------------------------------------------------------------------


class TextStage(Stage):
    """Cleans captions and rejects missing, undecodable, junk and wrong-language ones."""

    name: ClassVar[str] = "text"
    reasons: ClassVar[tuple[str, ...]] = REASONS
    repair_kinds: ClassVar[tuple[str, ...]] = REPAIRS
    fills: ClassVar[dict[str, Any]] = {schema.TEXT_SIG: ""}
    str_columns: ClassVar[tuple[str, ...]] = (schema.TEXT,)
    resources = Resources(num_cpus=0.5, batch_size=None)   # whole blocks, the read's CPUs: fuses
    # the reader, this stage and the image stage into one task per input file

    def __init__(self, cfg: TextConfig | None = None, *,
                 caption_normaliser: str = "presentation") -> None:
        self.cfg = cfg or TextConfig()
        self.caption_normaliser = caption_normaliser
        self._allowed = allowed_scripts(self.cfg.scripts)
        self._user = [re.compile(p, re.IGNORECASE) for p in self.cfg.junk_patterns]

    def process(self, batch: Batch) -> StageOutput:
        results = [self.clean(v) for v in batch[schema.TEXT]]
        texts, reasons, repairs = (_objects(r[i] for r in results) for i in range(3))
        mode = self.caption_normaliser
        sigs = _objects([text_signature(t, mode) if not r else ""
                         for t, r in zip(texts, reasons)])
        return StageOutput(columns={schema.TEXT: texts, schema.TEXT_SIG: sigs},
                           reasons=reasons, repairs=repairs)

    def clean(self, value: Any) -> tuple[str | None, str, str]:
        """One caption -> (text, reason, repairs); a rejected caption's text is the original,
        decoded leniently and cut to ``max_chars``."""
        text, reason = _decode(value)
        if reason:
            return _original(value, self.cfg.max_chars), reason, ""
        assert text is not None
        if len(text) > RAW_LENGTH_FACTOR * self.cfg.max_chars:
            return text[: self.cfg.max_chars], TEXT_TOO_LONG, ""
        clean, repairs = text, []
        if self.cfg.strip_html and ("<" in clean or "&" in clean):
            clean = _strip_html(clean)
            if clean != text:
                repairs.append(HTML_STRIPPED)
        if _needs_whitespace_fix(clean):
            clean = _normalise_whitespace(clean)
            if _needs_whitespace_fix(text):      # not merely the spaces left by removed tags
                repairs.append(WHITESPACE_NORMALISED)
        reason = self.check(clean)
        if reason:
            return text[: self.cfg.max_chars], reason, ""
        return clean, "", ";".join(repairs)

    def check(self, clean: str) -> str:
        """The reject reason of a clean caption, or ""."""
        cfg = self.cfg
        if not clean:
            return EMPTY_TEXT
        if len(clean) < cfg.min_chars or (cfg.min_words > 1 and
                                          len(clean.split()) < cfg.min_words):
            return TEXT_TOO_SHORT
        if len(clean) > cfg.max_chars:
            return TEXT_TOO_LONG
        if (cfg.junk_filter and _JUNK.fullmatch(clean)) or any(
                p.fullmatch(clean) for p in self._user):
            return JUNK_ALT_TEXT
        nonspace, letters, alpha, in_script = letter_stats(clean, self._allowed)
        if self._allowed and alpha and in_script < cfg.min_script_fraction * alpha:
            return WRONG_LANGUAGE
        if letters < cfg.min_letter_fraction * nonspace:
            return TOO_FEW_LETTERS
        return ""


def _original(value: Any, limit: int) -> str | None:
    """A rejected caption as kept for the record: str (invalid UTF-8 replaced), cut short."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)[: 4 * limit].decode("utf-8", errors="replace")[:limit]
    if isinstance(value, str):
        return value[:limit].encode("utf-8", errors="replace").decode("utf-8")
    return None


def _objects(values: Any) -> np.ndarray:
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


__all__ = ["EMPTY_TEXT", "HTML_STRIPPED", "JUNK_ALT_TEXT", "MISSING_TEXT", "RAW_LENGTH_FACTOR",
           "REASONS", "REPAIRS", "TEXT_NOT_UTF8", "TEXT_TOO_LONG", "TEXT_TOO_SHORT",
           "TOO_FEW_LETTERS", "WHITESPACE_NORMALISED", "WRONG_LANGUAGE", "TextStage",
           "allowed_scripts", "letter_stats"]
