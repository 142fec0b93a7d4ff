"""Typed, keyword-only settings: the one place to read every setting of every run and job.

A run is ``Config(data=..., model=..., objectives=[...], train=..., eval=...)``; recipes
(``vlmray.recipes``) are functions returning one; ``apply_overrides`` takes dotted
``section.field=value`` strings from the command line. The data jobs have their own trees
(``CurateJobConfig``, ``IndexJobConfig``, ``RewriteJobConfig``).

This package is the bottom layer: its modules import only each other and the standard library,
never another part of vlmray. Each dataclass checks its own fields when it is built (ranges,
``Literal`` choices, settings that must go together); checks that need a registry (model,
objective and view names) live with those packages and run once, from ``vlmray.validate``.

    run.py        Config and its sections DataConfig, ModelConfig, TrainConfig, EvalConfig
    data.py       SyntheticConfig, ViewsConfig, MixupConfig, PlacementConfig
    inputs.py     ReadConfig, DownloadConfig (how inputs are read and fetched)
    curation.py   TextConfig, ImageConfig, ScoreConfig, DedupConfig, WriteConfig, CurationConfig
    retrieval.py  RetrievalConfig, IndexConfig, EmbedConfig
    rewrite.py    RewriteConfig, SamplingConfig, ValidateConfig
    jobs.py       CurateJobConfig, IndexJobConfig, RewriteJobConfig
    objectives.py ObjectiveSpec
    sources.py    ``builtin[:<seed>?k=v]`` source specs
    overrides.py  dicts and dotted overrides -> configs
    errors.py     ConfigError
"""

from __future__ import annotations

from vlmray.config.curation import (
    CurationConfig,
    DedupConfig,
    ImageConfig,
    ScoreConfig,
    TextConfig,
    WriteConfig,
)
from vlmray.config.data import MixupConfig, PlacementConfig, SyntheticConfig, ViewsConfig
from vlmray.config.errors import ConfigError
from vlmray.config.inputs import DownloadConfig, ReadConfig
from vlmray.config.jobs import CurateJobConfig, IndexJobConfig, RewriteJobConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.config.overrides import (
    apply_overrides,
    field_paths,
    parse_objectives,
    parse_value,
    unknown_field_message,
)
from vlmray.config.retrieval import EmbedConfig, IndexConfig, RetrievalConfig
from vlmray.config.rewrite import RewriteConfig, SamplingConfig, ValidateConfig
from vlmray.config.run import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig

__all__ = [
    "Config", "ConfigError", "CurateJobConfig", "CurationConfig", "DataConfig", "DedupConfig",
    "DownloadConfig", "EmbedConfig", "EvalConfig", "ImageConfig", "IndexConfig",
    "IndexJobConfig", "MixupConfig", "ModelConfig", "ObjectiveSpec", "PlacementConfig",
    "ReadConfig", "RetrievalConfig", "RewriteConfig", "RewriteJobConfig", "SamplingConfig",
    "ScoreConfig", "SyntheticConfig", "TextConfig", "TrainConfig", "ValidateConfig",
    "ViewsConfig", "WriteConfig", "apply_overrides", "field_paths", "parse_objectives",
    "parse_value", "unknown_field_message",
]
