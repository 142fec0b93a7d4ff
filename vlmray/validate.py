"""The one place a run's config is checked before any work starts.

Each dataclass of :mod:`vlmray.config` checks its own fields when it is built. What needs a
registry or crosses sections runs here, once: ``Literal`` choices, objective names and
parameters (``vlmray.objectives``), the model's arch and towers (``vlmray.models``), and the
settings that must agree across sections (the RA-CLIP module and the retrieval feed, CLIPPO and
rendered text, the global batch and the worker count, the tokenizer). Every miss raises
``ConfigError`` naming the valid choices.

``check_resume`` compares a ``--resume``'s config with the one the run stored: changes the
checkpoint cannot load into (a weight's name or shape, the tokenizer, the image size) are
refused, listed; the rest (``train.*``, ``eval.*``, objective weights...) may change.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

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
    t = cfg.train        # numeric ranges: each section's own check (vlmray.config.run)
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


RESUME_FIXED = ("data.tokenizer", "data.vocab_size", "data.context_length", "data.image_size")
"""What a checkpoint is tied to whatever its tensors' shapes: the token ids and the image side
its weights learnt (a CNN tower loads at another side, but is not the same model)."""

_FILLED_LATER = ("model.ra_ref_dim",)
"""Fields a pipeline fills in before training (0 in a recipe: taken from the stored run)."""


def check_resume(stored: dict[str, Any], cfg: Config, run_dir: str = "") -> None:
    """Raises ``ConfigError`` when ``--resume`` with ``cfg`` cannot load the checkpoint of the
    run whose config is ``stored`` (its ``config.json``): a change of ``RESUME_FIXED``; a change
    of the model or the objectives that renames, adds, drops or reshapes a weight or buffer
    (both built on the meta device and compared; e.g. ``model.embed_dim``, or an objective
    param that sizes a head, while ``clip``'s ``gather`` or an objective's weight may change);
    or another number of single-source sampling's sources. Lists every such change."""
    old = _stored(stored, cfg)
    new = copy.deepcopy(cfg)
    for name in _FILLED_LATER:   # 0: the pipeline fills it in again, as it did for ``old``
        section, leaf = name.split(".")
        if not getattr(getattr(new, section), leaf):
            setattr(getattr(new, section), leaf, getattr(getattr(old, section), leaf))
    changes = _diff(old.to_dict(), new.to_dict())
    refused = {k: v for k, v in changes.items() if k.startswith(RESUME_FIXED)}
    detail = ""
    shaped = {k: v for k, v in changes.items() if k.startswith(("model.", "objectives"))}
    if shaped:
        differ = _state_difference(old, new)
        if differ is None or differ:
            refused.update(shaped)
            detail = ("; the weights differ: " + ", ".join(differ[:4]) if differ
                      else "; (the stored model could not be rebuilt to compare)")
    single = [c.data.sampling == "single_source" for c in (old, new)]
    n_sources = [1 + len(c.data.extra_sources) for c in (old, new)]
    if all(single) and n_sources[0] != n_sources[1]:
        refused["data.extra_sources"] = changes["data.extra_sources"]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise ConfigError(f"--resume {run_dir}: the checkpoint cannot load with these changes: "
                          f"{listed}{detail}. Undo them, or start a new run (another "
                          f"--output); train.*, eval.* and objective weights may change")


def _stored(stored: dict[str, Any], cfg: Config) -> Config:
    """The stored run's config, with this run's ``train`` and ``eval`` (they may change, and an
    old run's numbers need not pass today's ranges)."""
    d = copy.deepcopy(stored)
    d.update(train=dataclasses.asdict(cfg.train), eval=dataclasses.asdict(cfg.eval))
    try:
        return Config.from_dict(d)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"--resume: the run's stored config.json does not load: {e}") from None


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """Dotted name -> (old, new) of every leaf that differs (dicts are walked, lists are
    leaves)."""
    out: dict[str, tuple] = {}
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{name}."))
        elif a != b:
            out[name] = (a, b)
    return out


def _state_difference(old: Config, new: Config) -> list[str] | None:
    """The state-dict entries (model, then objectives) that differ in name or shape between
    the two configs' builds, or None when the old one cannot be built."""
    try:
        a = _state_shapes(old)
    except Exception:        # noqa: BLE001 - any failure to rebuild means "cannot compare"
        return None
    b = _state_shapes(new)
    return [f"{k} {a.get(k, 'missing')} -> {b.get(k, 'missing')}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _state_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint of ``cfg`` holds for the model and the
    objectives, built on the meta device (no memory, no init), or on the CPU for the few
    modules whose construction reads tensor values."""
    import torch

    from vlmray.objectives import ObjectiveMix
    from vlmray.train.state import build_core_model, setup_context

    def build(device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        with torch.device(device):
            core = build_core_model(cfg)
            return core, ObjectiveMix.from_specs(cfg.objectives).setup(setup_context(cfg, core))

    cfg = copy.deepcopy(cfg)
    cfg.model.vision_weights = ""          # a state dict to load: shapes come from the config
    try:
        core, mix = build("meta")
    except NotImplementedError:            # an op without a meta kernel: build it for real
        core, mix = build("cpu")
    return {**{f"model.{k}": tuple(v.shape) for k, v in core.state_dict().items()},
            **{k: tuple(v.shape) for k, v in mix.state_dict().items()}}   # "objectives.<name>..."


__all__ = ["RESUME_FIXED", "check_resume", "validate"]
