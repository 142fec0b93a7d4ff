"""The settings of the three data jobs: ``jobs/curate.py`` (:class:`CurateJobConfig`),
``jobs/build_index.py`` (:class:`IndexJobConfig`) and ``jobs/rewrite_captions.py``
(:class:`RewriteJobConfig`). Each composes the section settings of its stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from vlmray.config.curation import (
    CurationConfig,
    DedupConfig,
    ImageConfig,
    ScoreConfig,
    TextConfig,
    WriteConfig,
)
from vlmray.config.data import PlacementConfig, SyntheticConfig
from vlmray.config.inputs import DownloadConfig, ReadConfig
from vlmray.config.retrieval import EmbedConfig, IndexConfig
from vlmray.config.rewrite import RewriteConfig


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

Subset = Literal["all", "reference", "train"]


@dataclass(kw_only=True)


class IndexJobConfig:
    """What ``jobs/build_index.py`` runs: read -> [split] -> embed -> index per modality."""

    input: str = "builtin"
    """A dataset root with ``train/``, a curation output with ``shards/``, or a directory/glob/
    file of ``.tar``/``.parquet`` shards, local or ``s3://``; ``builtin`` generates the
    built-in dataset into ``<output>/raw`` and indexes its train split."""
    output: str = ""
    """Output root (local or ``s3://``): ``embeddings/``, ``rejects/``, ``index/``,
    ``stats.json``. Required."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Built-in dataset settings, used when ``input == "builtin"``."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Input format and column names."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """The embedding model, modality and actors."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """How each index is built (kind from size and memory budget unless named)."""
    subset: Subset = "all"
    """Rows to index: ``all``; ``reference``: only RA-CLIP's held-out reference split;
    ``train``: only the rows outside it."""
    reference_fraction: float = 0.0
    """Fraction of keys (a stable hash of each key) in the reference split."""
    split_seed: int = 0
    """Seed of the reference split's hash."""
    shards: int = 0
    """Parallel index-fill tasks (the embeddings re-cut into this many shards); 0 = one per
    embedding file."""
    holdout_queries: int = 1000
    """Noisy copies of indexed rows used to tune nprobe/efSearch and report recall@10."""

    def __post_init__(self) -> None:
        if self.subset not in get_args(Subset):
            raise ValueError(f"subset={self.subset!r}; valid choices: {list(get_args(Subset))}")
        if not 0.0 <= self.reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction must be in [0, 1], got "
                             f"{self.reference_fraction}")
        empty = {"reference": 0.0, "train": 1.0}.get(self.subset)
        if empty is not None and self.reference_fraction == empty:
            raise ValueError(f"subset={self.subset!r} with reference_fraction="
                             f"{self.reference_fraction} selects no rows")
        if self.shards < 0 or self.holdout_queries < 1:
            raise ValueError("shards must be >= 0 and holdout_queries >= 1")

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text") if self.embed.modality == "both" else (self.embed.modality,)


@dataclass(kw_only=True)


class RewriteJobConfig:
    """What ``jobs/rewrite_captions.py`` runs: read -> rewrite -> shards + stats.json."""

    input: str = "builtin"
    """Input: a dataset root (``<input>/shards`` or ``<input>/train``), a directory, glob or
    file of webdataset ``.tar`` / ``.parquet``, local or ``s3://``; ``builtin`` generates the
    built-in dataset into ``<output>/raw`` and rewrites its train split."""
    output: str = ""
    """Output root (local or ``s3://``): ``shards/``, ``eval/``, ``stats.json``."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Built-in dataset settings, used when ``input == "builtin"``."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Input format and column names."""
    write: WriteConfig = field(default_factory=WriteConfig)
    """Output shard format and size."""
    rewrite: RewriteConfig = field(default_factory=lambda: RewriteConfig(k=4))
    """Rewrites per caption (La-CLIP used 4), backend, model, sampling, validation, captioner."""


__all__ = ["CurateJobConfig", "IndexJobConfig", "RewriteJobConfig", "Subset"]
