"""Curation settings: the stage groups shared by the curation job and training's streaming
prefix (``data.curate``), plus the job's own input/output settings.

    CurateJobConfig(input="s3://raw/laion-part", output="s3://curated/v1",
                    image=ImageConfig(min_side=64), dedup=DedupConfig(phash_threshold=4))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmray.data.curation.dedup import DedupConfig
from vlmray.data.curation.download import DownloadConfig
from vlmray.data.curation.images import ImageConfig
from vlmray.data.curation.readers import ReadConfig
from vlmray.data.curation.score import ScoreConfig
from vlmray.data.curation.text import TextConfig
from vlmray.data.curation.writers import WriteConfig
from vlmray.data.placement import PlacementConfig
from vlmray.data.synthetic import SyntheticConfig


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


@dataclass(kw_only=True)
class CurateJobConfig:
    """What ``jobs/curate.py`` runs: read -> [download] -> text -> image -> [score] -> dedup
    [-> keep top fraction] -> write shards, rejects/ and stats.json."""

    input: str = "builtin"
    """Input: a directory, glob or file of webdataset ``.tar`` / ``.parquet`` / URL lists
    (``.csv``, ``.tsv``, ``.jsonl``, ``.txt``), local or ``s3://``; ``builtin`` generates the
    built-in noisy dataset into ``<output>/raw`` and curates its train split."""
    output: str = ""
    """Output root (local or ``s3://``): ``shards/``, ``rejects/``, ``stats.json``."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Built-in dataset settings, used when ``input == "builtin"``."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Input format and column names."""
    download: DownloadConfig = field(default_factory=DownloadConfig)
    """Downloader for URL-list inputs."""
    text: TextConfig = field(default_factory=TextConfig)
    """Caption cleaning and filters."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image decoding, validation, repairs and re-encoding."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Image-text agreement filter (off unless a model is given)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Duplicate keys, exact and near-duplicate images, repeated captions."""
    write: WriteConfig = field(default_factory=WriteConfig)
    """Output shard format and size."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Custom resources of the data stages (which nodes read and curate) and the stream's
    object-store budget, CPU budget and block size."""
    keep_staging: bool = False
    """Keep ``<output>/_staging`` (the validated rows before deduplication) after success."""

    def curation(self) -> CurationConfig:
        return CurationConfig(text=self.text, image=self.image, score=self.score,
                              dedup=self.dedup, download=self.download)


__all__ = ["CurateJobConfig", "CurationConfig"]
