"""Curation settings: the stage groups shared by the curation job and training's streaming
prefix (``data.curate``): caption filters, image checks, scoring, deduplication and output
shards (how inputs are read and downloaded: :mod:`vlmray.config.inputs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from vlmray.config.inputs import DownloadConfig

SCRIPTS = ("latin", "greek", "cyrillic", "armenian", "georgian", "hebrew", "arabic", "syriac",
           "thaana", "nko", "devanagari", "bengali", "gurmukhi", "gujarati", "oriya", "tamil",
           "telugu", "kannada", "malayalam", "sinhala", "thai", "lao", "tibetan", "myanmar",
           "khmer", "mongolian", "ethiopic", "cherokee", "canadian", "hangul", "hiragana",
           "katakana", "bopomofo", "cjk", "yi", "javanese", "balinese", "sundanese", "tifinagh",
           "vai", "coptic", "glagolitic", "runic", "ogham")

_CJK = ("CJK", "IDEOGRAPHIC")

SCRIPT_GROUPS = {"han": _CJK, "chinese": (*_CJK, "BOPOMOFO"), "korean": ("HANGUL", *_CJK),
                 "japanese": ("HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", *_CJK)}


@dataclass(kw_only=True)


class TextConfig:
    """How captions are cleaned and which are rejected."""

    strip_html: bool = True
    """Unescape HTML entities (``&amp;``) and remove tags (``<b>``, ``<br/>``, comments)."""
    min_chars: int = 3
    """Reject clean captions shorter than this many characters (``text_too_short``)."""
    max_chars: int = 1000
    """Reject clean captions longer than this many characters (``text_too_long``)."""
    min_words: int = 1
    """Reject clean captions with fewer whitespace-separated words (``text_too_short``)."""
    junk_filter: bool = True
    """Reject web alt-text junk with the built-in patterns: file names (``IMG_4821.jpg``),
    generic words (``image``, ``photo``, ``logo``), ``click here``, bare URLs, placeholders."""
    junk_patterns: list[str] = field(default_factory=list)
    """Extra regexes matched against the WHOLE clean caption (``re.fullmatch``, case-insensitive;
    write ``.*sale.*`` to match anywhere). Applied even when ``junk_filter`` is off."""
    scripts: list[str] = field(default_factory=lambda: ["latin"])
    """Allowed Unicode scripts (e.g. ``latin``, ``cyrillic``, ``cjk``, ``arabic``) or groups
    (``chinese``, ``japanese``, ``korean``); an empty list allows any language."""
    min_script_fraction: float = 0.8
    """Reject when less than this fraction of the letters is in an allowed script
    (``wrong_language``)."""
    min_letter_fraction: float = 0.4
    """Reject when less than this fraction of non-space characters are letters
    (``too_few_letters``)."""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.min_words < 0:
            raise ValueError(f"TextConfig.min_chars ({self.min_chars}) and min_words "
                             f"({self.min_words}) must be >= 0")
        if not self.min_chars <= self.max_chars or self.max_chars < 1:
            raise ValueError(f"TextConfig.max_chars must be >= 1 and >= min_chars "
                             f"({self.min_chars}), got {self.max_chars}")
        for name in ("min_script_fraction", "min_letter_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TextConfig.{name} must be in [0, 1], got {value}")
        for name in ("scripts", "junk_patterns"):
            if isinstance(getattr(self, name), str):  # config errors are all ValueError
                raise ValueError(  # noqa: TRY004
                    f"TextConfig.{name} must be a list of strings, got {getattr(self, name)!r}")
        unknown = [s for s in self.scripts if s.lower() not in SCRIPTS + tuple(SCRIPT_GROUPS)]
        if unknown:
            raise ValueError(f"TextConfig.scripts: unknown {unknown}; valid: "
                             f"{sorted(SCRIPTS + tuple(SCRIPT_GROUPS))} (or [] for any)")
        for pattern in self.junk_patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"TextConfig.junk_patterns: {pattern!r} is not a valid "
                                 f"regex: {e}") from None

IMAGE_SUFFIX = {"jpeg": "jpg", "png": "png", "webp": "webp"}
"""Output format -> webdataset member suffix."""


@dataclass(kw_only=True)


class ImageConfig:
    """How images are validated, repaired, resized and re-encoded."""

    min_side: int = 16
    """Reject images whose shorter side (after EXIF orientation) is below this
    (``image_too_small``)."""
    max_aspect: float = 3.0
    """Reject images whose longer/shorter side ratio exceeds this (``bad_aspect_ratio``)."""
    max_pixels: int = 40_000_000
    """Decompression-bomb guard: reject images whose header declares more pixels, before any
    pixel is decoded (``decompression_bomb``). PIL's own ``Image.MAX_IMAGE_PIXELS`` also
    applies."""
    resize: Literal["none", "keep_ratio", "center_crop"] = "keep_ratio"
    """``keep_ratio``: shorter side down to ``target_size``; ``center_crop``: that, then the
    centre square; ``none``: keep the size. Images are never upscaled."""
    target_size: int = 256
    """Shorter side after resizing, in pixels."""
    format: Literal["jpeg", "png", "webp"] = "jpeg"
    """Output encoding (always 8-bit RGB, without EXIF or ICC metadata)."""
    quality: int = 95
    """JPEG/WebP quality, 1-100 (ignored for PNG)."""
    reencode: bool = True
    """False: keep the original bytes when the image is already in ``format``, plain RGB or
    greyscale, and needs no repair, resize or crop."""

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.target_size < 1:
            raise ValueError(f"ImageConfig.min_side ({self.min_side}) and target_size "
                             f"({self.target_size}) must be >= 1")
        if self.max_aspect < 1.0:
            raise ValueError(f"ImageConfig.max_aspect must be >= 1.0, got {self.max_aspect}")
        if self.max_pixels < self.min_side ** 2:
            raise ValueError(f"ImageConfig.max_pixels must be >= min_side**2 "
                             f"({self.min_side ** 2}), got {self.max_pixels}")
        if self.resize not in ("none", "keep_ratio", "center_crop"):
            raise ValueError(f"ImageConfig.resize {self.resize!r}: valid: 'none', "
                             f"'keep_ratio', 'center_crop'")
        if self.format not in IMAGE_SUFFIX:
            raise ValueError(f"ImageConfig.format {self.format!r}: valid: "
                             f"{', '.join(map(repr, IMAGE_SUFFIX))}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"ImageConfig.quality must be in [1, 100], got {self.quality}")


@dataclass(kw_only=True)


class ScoreConfig:
    """The scoring model, the filters on its score, and how the stage is scheduled."""

    model: str = ""
    """"" = scoring off; a vlmray run or checkpoint directory (local or ``s3://``; the latest
    checkpoint under it is used), or ``hf:<local dir>`` holding a ``transformers`` CLIP model
    with its tokenizer."""
    min_score: float = -2.0
    """Reject rows whose cosine score is below this (``low_clip_score``); below -1 = off."""
    keep_top_fraction: float = 1.0
    """Keep only this fraction of live rows, best scores first (DataComp's top-30% is 0.3);
    1.0 = off. Decided over the whole dataset, after deduplication."""
    batch_size: int = 64
    """Rows per model forward pass (and per Ray Data batch)."""
    actors: int = 1
    """Scoring actors; each loads the model once."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (fractional shares a GPU); 0 = CPU actors."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when the actor sees a GPU, else CPU."""

    def __post_init__(self) -> None:
        if self.min_score > 1.0:
            raise ValueError(f"ScoreConfig.min_score must be <= 1 (a cosine), got "
                             f"{self.min_score}")
        if not 0.0 < self.keep_top_fraction <= 1.0:
            raise ValueError(f"ScoreConfig.keep_top_fraction must be in (0, 1], got "
                             f"{self.keep_top_fraction}")
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise ValueError(f"ScoreConfig.num_gpus must be >= 0, got {self.num_gpus}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"ScoreConfig.device must be one of auto, cpu, cuda; "
                             f"got {self.device!r}")
        if self.num_gpus > 0 and self.device == "cpu":
            raise ValueError("ScoreConfig.num_gpus > 0 reserves GPUs that device='cpu' won't use")
        if not self.model and (self.min_score >= -1.0 or self.keep_top_fraction < 1.0):
            raise ValueError("ScoreConfig.min_score / keep_top_fraction need a scoring model "
                             "(ScoreConfig.model is empty)")

    @property
    def enabled(self) -> bool:
        return bool(self.model)

MAX_PHASH_THRESHOLD = 16        # unrelated images differ in ~32 bits; more is no near-dup
CaptionNormaliser = Literal["presentation", "exact", "digits"]
CAPTION_NORMALISERS: tuple[str, ...] = get_args(CaptionNormaliser)
"""Valid ``DedupConfig.caption_normaliser`` values
(:func:`vlmray.data.curation.hashing.normalise_caption`)."""


@dataclass(kw_only=True)


class DedupConfig:
    """Which duplicate rules run, and how close counts as a duplicate."""

    keys: bool = True
    """Reject rows whose key repeats an earlier row's (``duplicate_key``)."""
    exact: bool = True
    """Reject rows whose image bytes (SHA-256) equal an earlier row's (``duplicate_image``)."""
    near: bool = True
    """Reject rows whose image phash is within ``phash_threshold`` bits of an earlier kept
    row's (``near_duplicate_image``)."""
    phash_threshold: int = 4
    """Largest Hamming distance between 64-bit phashes that counts as a near-duplicate."""
    captions: bool = True
    """Reject rows whose caption repeats too often (``repeated_caption``): boilerplate
    alt-text ("click here", "image", "DSC0001.jpg") shared by many unrelated images."""
    max_caption_repeats: int = 15
    """The repeat limit: a row is rejected when its caption is the same (after
    ``caption_normaliser``) as more than this many earlier kept captions, so the first
    ``1 + max_caption_repeats`` rows of a caption are kept. Class-name captions of a labelled
    set ("a photo of a dog" for every dog) repeat by design: raise it, or set ``captions``
    off, for such data."""
    caption_normaliser: CaptionNormaliser = "presentation"
    """What makes two captions "the same" for ``max_caption_repeats`` (and the word shingles
    of ``caption_jaccard``): ``presentation`` (default) ignores only case, Unicode
    compatibility forms, punctuation outside numbers and runs of whitespace, so captions that
    differ in any word (a number, a count word, "not", a colour) stay distinct; ``exact``
    compares the cleaned text itself; ``digits`` also maps every digit run to 0 (numbered
    boilerplate such as "photo 16" / "photo 17" merges, but so do real counts: "3 red
    circles" / "2 red circles")."""
    caption_jaccard: float = 0.0
    """0: captions are duplicates only when their normalised text is equal; > 0: also when
    the Jaccard similarity of their word shingles is at least this (MinHash + LSH)."""
    caption_shingle: int = 2
    """Words per shingle for ``caption_jaccard`` (a caption shorter than this is one shingle)."""
    partitions: int = 0
    """How many partitions the decision runs in when it runs through the two-pass global step
    (:mod:`vlmray.data.curation.dedup_partitioned`): 0 = one per ~5M live rows, so a table
    smaller than that stays in one task; 1 = one task over the whole compact table; N > 1 =
    N partitions (each rule hashes a value to one of N, one bounded Ray task each). The
    decisions are the same whatever the number; only memory per task and parallelism change."""

    def __post_init__(self) -> None:
        checks = {"phash_threshold": 0 <= self.phash_threshold <= MAX_PHASH_THRESHOLD,
                  "max_caption_repeats": self.max_caption_repeats >= 0,
                  "caption_jaccard": 0.0 <= self.caption_jaccard <= 1.0,
                  "caption_shingle": self.caption_shingle >= 1,
                  "partitions": self.partitions >= 0,
                  "caption_normaliser": self.caption_normaliser in CAPTION_NORMALISERS}
        bounds = {"phash_threshold": f"in [0, {MAX_PHASH_THRESHOLD}]",
                  "max_caption_repeats": ">= 0", "caption_jaccard": "in [0, 1]",
                  "caption_shingle": ">= 1", "partitions": ">= 0 (0 = auto)",
                  "caption_normaliser": f"one of {', '.join(CAPTION_NORMALISERS)}"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DedupConfig.{name} must be {bounds[name]}, "
                                 f"got {getattr(self, name)!r}")


@dataclass(kw_only=True)


class WriteConfig:
    format: Literal["webdataset", "parquet"] = "webdataset"
    """Output shards: ``webdataset`` (``.tar`` of ``{key}.jpg/.txt/.json``, as img2dataset
    writes) or ``parquet`` (columns key, image, text, meta)."""
    shard_size: int = 1000
    """Rows per output shard (the last one may hold fewer)."""
    prefix: str = "part"
    """Shard file names: ``<prefix>-00000.tar``."""
    piece_rows: int = 1024
    """Rows per piece of the streamed writer (one Ray Data batch, written as one temporary
    parquet file under ``shards/_pieces``): larger pieces mean fewer files and a smaller index
    on the driver (about 100 bytes per piece), smaller ones less memory per writer task."""

    def __post_init__(self) -> None:
        if self.format not in ("webdataset", "parquet"):
            raise ValueError(f"write.format {self.format!r}: valid: 'webdataset', 'parquet'")
        if self.shard_size <= 0:
            raise ValueError(f"write.shard_size must be > 0, got {self.shard_size}")
        if self.piece_rows <= 0:
            raise ValueError(f"write.piece_rows must be > 0, got {self.piece_rows}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"write.prefix {self.prefix!r} must be non-empty, without '/'")

    def shard_name(self, index: int) -> str:
        ext = "tar" if self.format == "webdataset" else "parquet"
        return f"{self.prefix}-{index:05d}.{ext}"


@dataclass(kw_only=True)


class CurationConfig:
    """The row-level and whole-dataset stages, in plan order: text, image, score, dedup."""

    text: TextConfig = field(default_factory=TextConfig)
    """Caption cleaning and filters."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image decoding, validation, repairs and re-encoding."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Image-text agreement filter (off unless a model is given)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Duplicate keys, exact and near-duplicate images, repeated captions."""
    download: DownloadConfig = field(default_factory=DownloadConfig)
    """Downloader for URL-list inputs (img2dataset-style url/caption tables)."""


__all__ = ["CAPTION_NORMALISERS", "IMAGE_SUFFIX", "MAX_PHASH_THRESHOLD", "SCRIPTS",
           "SCRIPT_GROUPS", "CaptionNormaliser", "CurationConfig", "DedupConfig", "ImageConfig",
           "ScoreConfig", "TextConfig", "WriteConfig"]
