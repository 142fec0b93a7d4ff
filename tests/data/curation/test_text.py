"""TextStage: decoding, cleaning, every reject reason and repair, and the built-in captions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vlmray.config.curation import TextConfig
from vlmray.data import schema
from vlmray.data.curation import text as text_mod
from vlmray.data.curation.hashing import text_signature
from vlmray.data.curation.text import (
    EMPTY_TEXT,
    HTML_STRIPPED,
    JUNK_ALT_TEXT,
    MISSING_TEXT,
    REASONS,
    REPAIRS,
    TEXT_NOT_UTF8,
    TEXT_TOO_LONG,
    TEXT_TOO_SHORT,
    TOO_FEW_LETTERS,
    WHITESPACE_NORMALISED,
    WRONG_LANGUAGE,
    TextStage,
)
from vlmray.data.synthetic_text import COLOURS, SHAPES, caption, junk_alt_text, stuffed


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _run(texts: list, cfg: TextConfig | None = None) -> dict[str, np.ndarray]:
    n = len(texts)
    batch = {schema.KEY: _objects([f"k{i}" for i in range(n)]), schema.TEXT: _objects(texts),
             schema.META: _objects([None] * n), schema.ROW_ID: np.arange(n, dtype=np.int64)}
    return TextStage(cfg)(batch)


def _one(value: object, cfg: TextConfig | None = None) -> tuple[str, str, str]:
    out = _run([value], cfg)
    return out[schema.TEXT][0], out[schema.REJECT_REASON][0], out[schema.REPAIRS][0]


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"min_chars": -1}, "min_chars"),
    ({"min_chars": 10, "max_chars": 5}, "max_chars"),
    ({"max_chars": 0, "min_chars": 0}, "max_chars"),
    ({"min_words": -2}, "min_words"),
    ({"min_script_fraction": 1.5}, "[0, 1]"),
    ({"min_letter_fraction": -0.1}, "[0, 1]"),
    ({"scripts": ["latin", "klingon"]}, "'cyrillic'"),
    ({"junk_patterns": ["(unclosed"]}, "not a valid regex"),
    ({"scripts": "latin"}, "list of strings"),
])
def test_config_rejects_invalid_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError) as err:
        TextConfig(**kwargs)
    assert words in str(err.value)


def test_config_defaults_and_script_names() -> None:
    cfg = TextConfig()
    assert (cfg.strip_html, cfg.max_chars, cfg.junk_filter, cfg.scripts) == (True, 1000, True,
                                                                              ["latin"])
    assert cfg.junk_patterns == [] and TextConfig().scripts is not cfg.scripts
    TextConfig(scripts=["Latin", "CJK", "japanese", "korean", "chinese"])   # any case, groups
    assert set(TextStage.reasons) == set(REASONS) and set(TextStage.repair_kinds) == set(REPAIRS)


# --- reasons -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, reason", [
    (None, MISSING_TEXT),
    (3.5, MISSING_TEXT),
    (b"\xff\xfe caf\xe9", TEXT_NOT_UTF8),
    ("bad \udcff surrogate", TEXT_NOT_UTF8),
    (b"", EMPTY_TEXT),
    (" \t\n\u00a0\u3000\u200b ".encode(), EMPTY_TEXT),
    (b"<p> </p><br/>", EMPTY_TEXT),
    (b"ok", TEXT_TOO_SHORT),
    (b"x" * 1001, TEXT_TOO_LONG),
    (b"a long caption " * 7000, TEXT_TOO_LONG),
    (b"IMG_4821.jpg", JUNK_ALT_TEXT),
    ("Кошка спит на диване".encode(), WRONG_LANGUAGE),
    ("一只猫在沙发上睡觉".encode(), WRONG_LANGUAGE),
    ("★★★★★ 5/5 (1,024)".encode(), TOO_FEW_LETTERS),
    (b"2021-05-04 12:30:00", TOO_FEW_LETTERS),
])
def test_each_reason(value: object, reason: str) -> None:
    assert _one(value)[1] == reason


@pytest.mark.parametrize("junk", [
    "IMG_4821.jpg", "DSC01234.JPG", "DSCN0042", "PXL_20210101_123456789", "P1010001",
    "000186a0.png", "my-holiday_2019.jpeg", "image", "Image 3", "(photo)", "PHOTO!", "untitled",
    "Untitled-1", "click here", "Click here!", "read more", "Read more...", "logo", "Logo",
    "thumbnail", "no image available", "image not found", "placeholder", "n/a", "null",
    "undefined", "[object Object]", "{{alt_text}}", "Lorem ipsum dolor sit amet",
    "https://example.com/images/cat.png", "www.example.org", "example.com", "Screenshot 12345",
    "Screenshot 2021-01-01 at 10.00.00 AM", "3f2a9c1b", "a8f3e2d1-7c4b-4a5e-9f10-2b3c4d5e6f70",
    "download now", "no description available", "  image  ",
])
def test_builtin_junk_patterns(junk: str) -> None:
    assert _one(junk.encode())[1] == JUNK_ALT_TEXT, junk


@pytest.mark.parametrize("real", [
    "a photo of a dog on the beach", "image of the week: a red fox in the snow",
    "Click here to see a red bicycle", "Logo of the 2012 Olympic games in London",
    "An untitled painting by Mark Rothko", "DSC team photo at the 2019 summit",
    "read more about the old lighthouse", "photographed from the hills above Rome",
    "The Eiffel Tower at night", "café au lait with a croissant",
])
def test_real_captions_mentioning_junk_words_are_kept(real: str) -> None:
    assert _one(real.encode()) == (real, "", "")


def test_user_patterns_match_whole_caption_and_apply_without_builtins() -> None:
    cfg = TextConfig(junk_patterns=[r".*\bsale\b.*", "buy"], junk_filter=False)
    assert _one(b"Big summer SALE today", cfg)[1] == JUNK_ALT_TEXT
    assert _one(b"buy", cfg)[1] == JUNK_ALT_TEXT
    assert _one(b"buy a red car", cfg)[1] == ""              # fullmatch, not search
    assert _one(b"IMG_4821.jpg", cfg)[1] == ""               # built-ins off


def test_length_limits_and_min_words() -> None:
    assert _one(b"x" * 1000)[1] == ""
    assert _one(b"red car", TextConfig(min_words=3))[1] == TEXT_TOO_SHORT
    assert _one(b"a red car", TextConfig(min_words=3))[1] == ""
    assert _one(b"abcd", TextConfig(min_chars=5))[1] == TEXT_TOO_SHORT
    assert _one(b"short and sweet", TextConfig(max_chars=10))[1] == TEXT_TOO_LONG


def test_a_huge_caption_is_rejected_before_any_cleaning(monkeypatch) -> None:
    def boom(*_: object) -> str:
        raise AssertionError("cleaned a caption that was too long already")

    monkeypatch.setattr(text_mod, "_strip_html", boom)
    monkeypatch.setattr(text_mod, "_normalise_whitespace", boom)
    monkeypatch.setattr(text_mod, "_JUNK", None)
    kept, reason, _ = _one(b"<b>cheap</b> hd wallpaper   " * 4000)
    assert reason == TEXT_TOO_LONG and kept == ("<b>cheap</b> hd wallpaper   " * 40)[:1000]


def test_scripts() -> None:
    ru, ja = "Кошка спит на диване".encode(), "猫がソファで寝ている".encode()
    assert _one(ru, TextConfig(scripts=["cyrillic"]))[1] == ""
    assert _one(ru, TextConfig(scripts=[]))[1] == ""
    assert _one(ja, TextConfig(scripts=["japanese"]))[1] == ""
    assert _one(ja, TextConfig(scripts=["cjk"]))[1] == WRONG_LANGUAGE      # kana are not CJK
    assert _one(b"a cat sleeping on a sofa", TextConfig(scripts=["cyrillic"]))[1] == \
        WRONG_LANGUAGE
    mostly_latin = "a beautiful sunset over the river in Москва".encode()
    assert _one(mostly_latin)[1] == ""
    assert _one("Москва at night, from above".encode())[1] == WRONG_LANGUAGE
    assert _one("ＦＵＬＬＷＩＤＴＨ ｌａｔｉｎ letters".encode())[1] == ""
    assert _one("Ελληνικά γράμματα".encode(), TextConfig(scripts=["greek"]))[1] == ""


def test_letter_fraction_counts_marks_and_is_configurable() -> None:
    hindi = "नमस्ते दुनिया".encode()
    assert _one(hindi, TextConfig(scripts=["devanagari"]))[1] == ""
    assert _one("★★★★★ 5/5".encode(), TextConfig(min_letter_fraction=0.0))[1] == ""
    assert _one(b"Top 10 of 2021", TextConfig(min_letter_fraction=0.4))[1] == ""


# --- cleaning and repairs ----------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean, repairs", [
    (b"a dog on the beach", "a dog on the beach", ""),
    (b"<p>A cat &amp; a dog on a <b>sofa</b></p>", "A cat & a dog on a sofa", HTML_STRIPPED),
    (b"Fish &amp;amp; chips", "Fish &amp; chips", HTML_STRIPPED),
    (b"&lt;b&gt;bold&lt;/b&gt; claims", "bold claims", HTML_STRIPPED),
    (b"a<br/>b<!-- hidden -->c line", "a b c line", HTML_STRIPPED),
    (b"x<script>alert(1)</script> y z", "x y z", HTML_STRIPPED),
    (b"caf&eacute; &#8211; open", "café – open", HTML_STRIPPED),
    (b"1 < 2 and 3 > 2 in math", "1 < 2 and 3 > 2 in math", ""),
    (" a  dog\u00a0on\tthe\nbeach ".encode(), "a dog on the beach", WHITESPACE_NORMALISED),
    ("\ufeffa red\u00adcar\u200b in\x00 town".encode(), "a redcar in town", WHITESPACE_NORMALISED),
    ("a\u2028b\u3000c\x85 dog".encode(), "a b c dog", WHITESPACE_NORMALISED),
    (b" <i>a</i>  dog ", "a dog", f"{HTML_STRIPPED};{WHITESPACE_NORMALISED}"),
    (b"a&nbsp;dog on grass", "a dog on grass", HTML_STRIPPED),
])
def test_cleaning_and_repairs(raw: bytes, clean: str, repairs: str) -> None:
    assert _one(raw) == (clean, "", repairs)


def test_strip_html_can_be_turned_off() -> None:
    assert _one(b"<b>bold</b> claim here", TextConfig(strip_html=False)) == \
        ("<b>bold</b> claim here", "", "")


@pytest.mark.parametrize("value", ["a dog on grass", np.str_("a dog on grass"),
                                   bytearray(b"a dog on grass"), b"a dog on grass"])
def test_input_types(value: object) -> None:
    assert _one(value) == ("a dog on grass", "", "")


def test_output_columns() -> None:
    texts = [b"  A  Photo of a DOG!", None, b"\xffbad " * 500, "Кошка".encode(), b"a cat"]
    out = _run(texts)
    assert list(out[schema.REJECT_REASON]) == ["", MISSING_TEXT, TEXT_NOT_UTF8, WRONG_LANGUAGE,
                                               ""]
    assert list(out[schema.REJECT_STAGE]) == ["", "text", "text", "text", ""]
    assert out[schema.TEXT][0] == "A Photo of a DOG!"
    assert out[schema.TEXT_SIG][0] == text_signature("a photo of a dog")
    assert list(out[schema.TEXT_SIG][1:4]) == ["", "", ""]
    assert out[schema.TEXT_SIG][4] == text_signature("a cat")
    # rejected rows keep their caption for the record: str, invalid bytes replaced, cut short
    assert out[schema.TEXT][1] is None
    assert out[schema.TEXT][2].startswith("\ufffdbad ") and len(out[schema.TEXT][2]) == 1000
    assert all(isinstance(t, str) for t in out[schema.TEXT][[0, 2, 3, 4]])
    assert out[schema.TEXT].dtype == object and out[schema.TEXT_SIG].dtype == object
    assert list(out[schema.KEY]) == [f"k{i}" for i in range(5)]
    assert list(out[schema.ROW_ID]) == list(range(5))


def test_rows_rejected_earlier_pass_through_untouched() -> None:
    batch = {schema.KEY: _objects(["a", "b", "c"]),
             schema.TEXT: _objects([b"\xff not utf8", b" a  red car ", None]),
             schema.IMAGE: _objects([b"img-a", b"img-b", b"img-c"]),
             schema.REJECT_REASON: _objects(["download_failed", "", "download_failed"]),
             schema.REJECT_STAGE: _objects(["download", "", "download"]),
             schema.REPAIRS: _objects(["", "", ""])}
    out = TextStage()(batch)
    # skipped captions are only made str (one Arrow type per column), never cleaned or judged
    assert out[schema.TEXT][0] == "\ufffd not utf8" and out[schema.TEXT][2] is None
    assert list(out[schema.REJECT_REASON]) == ["download_failed", "", "download_failed"]
    assert list(out[schema.REJECT_STAGE]) == ["download", "", "download"]
    assert list(out[schema.TEXT_SIG]) == ["", text_signature("a red car"), ""]
    assert list(out[schema.REPAIRS]) == ["", WHITESPACE_NORMALISED, ""]
    assert list(out[schema.IMAGE]) == [b"img-a", b"img-b", b"img-c"]
    assert batch[schema.TEXT][1] == b" a  red car "                # the input is not modified
    everyone_out = TextStage()({k: v[[0]] for k, v in batch.items()})
    assert list(everyone_out[schema.TEXT_SIG]) == [""]


def test_deterministic() -> None:
    texts = [b"<b>A</b> dog", b"  two cats ", "Кошка".encode(), b"IMG_0001.jpg", None]
    a, b = _run(texts), _run(list(texts))
    for col in (schema.TEXT, schema.TEXT_SIG, schema.REJECT_REASON, schema.REPAIRS):
        assert list(a[col]) == list(b[col])


# --- the built-in dataset's captions -----------------------------------------------------------


def _scenes(n: int, rng: np.random.Generator) -> list[SimpleNamespace]:
    """Scenes as ``synthetic_text.caption`` reads them, covering every class/count/region."""
    regions = ("left", "right", "top", "bottom", "centre", "anywhere")
    out = []
    for i in range(n):
        shape, colour = i % len(SHAPES), (i // len(SHAPES)) % len(COLOURS)
        out.append(SimpleNamespace(
            shape=shape, colour=colour, label=shape * len(COLOURS) + colour,
            size=("small", "large")[int(rng.integers(2))], region=regions[i % len(regions)],
            objects=[(0.5, 0.5, 0.1)] * int(rng.integers(1, 4))))
    return out


def test_builtin_captions_kept_junk_and_stuffing_rejected() -> None:
    rng = np.random.default_rng(0)
    scenes = _scenes(500, rng)
    captions = [caption(s, rng) for s in scenes]
    junk = [junk_alt_text(rng) for _ in range(500)]
    overlong = [stuffed(c, s, rng, 2000) for c, s in zip(captions[:100], scenes)]
    out = _run([t.encode() for t in captions + junk + overlong])
    reasons = out[schema.REJECT_REASON]
    kept_wrongly = [t for t, r in zip(captions, reasons[:500]) if r]
    assert not kept_wrongly, kept_wrongly[:5]
    missed = [t for t, r in zip(junk, reasons[500:1000]) if r != JUNK_ALT_TEXT]
    assert not missed, missed[:5]
    assert set(reasons[1000:]) == {TEXT_TOO_LONG}
    assert list(out[schema.TEXT][:500]) == captions
