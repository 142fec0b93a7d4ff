"""The one place a run's config is checked before any work starts.

Each dataclass of :mod:`vlmray.config` checks its own fields when it is built. What needs a
registry or crosses sections runs here, once: ``Literal`` choices, objective names and
parameters (``vlmray.objectives``), the model's arch and towers (``vlmray.models``), and the
settings that must agree across sections (the RA-CLIP module and the retrieval feed, CLIPPO and
rendered text, the global batch and the worker count, the tokenizer). Every miss raises
``ConfigError`` naming the valid choices.
"""

from __future__ import annotations

import math
from pathlib import Path

from vlmray.config import Config, ConfigError
from vlmray.config.overrides import check_literals
from vlmray.models import validate_model_config
from vlmray.objectives import validate_specs


def validate(cfg: Config) -> Config:
    """Checks names and ranges; raises ``ConfigError`` naming the valid choices."""
    check_literals(cfg)
    if not cfg.objectives:
        raise ConfigError("at least one objective is required")
    try:
        validate_specs(cfg.objectives)  # names, params, weights, no repeats
    except ValueError as e:  # UnknownNameError is a ValueError too
        raise ConfigError(f"objectives: {e}") from None
    _check_retrieval(cfg)
    if cfg.model.arch == "clippo" and not cfg.data.views.render_text:
        raise ConfigError("model.arch='clippo' encodes captions rendered as images: set "
                          "data.views.render_text=True (the views stage draws TEXT_PIXELS)")
    validate_model_config(cfg.model,
                          ref_dim_filled_later=cfg.data.retrieval.attach == "references")
    t = cfg.train
    if t.steps <= 0 or t.batch_size <= 0 or t.lr <= 0 or not math.isfinite(t.lr):
        raise ConfigError("train.steps, train.batch_size and train.lr must be positive")
    if t.num_workers and t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by "
                          f"train.num_workers {t.num_workers}")
    tok = cfg.data.tokenizer
    if tok != "hash" and not tok.startswith("hf:"):
        raise ConfigError(f"data.tokenizer {tok!r}: valid: 'hash', 'hf:<local directory>'")
    if tok.startswith("hf:") and not Path(tok[3:]).is_dir():
        raise ConfigError(f"data.tokenizer {tok!r}: {tok[3:]!r} is not a local directory")
    return cfg


def _check_retrieval(cfg: Config) -> None:
    """The model part and objectives that consume neighbours agree with ``data.retrieval``."""
    attach = cfg.data.retrieval.attach
    if (cfg.model.ra_layers > 0) != (attach == "references"):
        raise ConfigError(f"model.ra_layers={cfg.model.ra_layers} with data.retrieval.attach="
                          f"{attach!r}: the RA-CLIP module (ra_layers > 0) and "
                          f"attach='references' go together")
    nns_index = any(s.name == "declip_nns" and s.params.get("source") == "index"
                    for s in cfg.objectives)
    if nns_index and attach != "neighbour_text":
        raise ConfigError("objective declip_nns with source='index' reads each row's neighbour "
                          "caption: set data.retrieval.attach='neighbour_text' (or use "
                          "source='queue')")
    if cfg.data.retrieval.train_on == "reference" and cfg.data.retrieval.enabled:
        raise ConfigError("data.retrieval.train_on='reference' is the bootstrap run's setting "
                          "and takes attach='none'")


__all__ = ["validate"]
