"""Models: towers, the dual encoder, and the factory that builds them from a ModelConfig."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from vlmray._registry import Registry
from vlmray.models.dual_encoder import DualEncoder
from vlmray.models.outputs import NN_TEXT_EMBEDS, Outputs
from vlmray.models.retrieval_aug import RetrievalAugmentation
from vlmray.models.towers import (
    TextTower,
    VisionTower,
    check_text_config,
    check_vision_name,
)

if TYPE_CHECKING:
    from vlmray.config import ModelConfig


ModelBuilder = Callable[..., nn.Module]
MODEL_ARCHS: Registry[ModelBuilder] = Registry("model arch")
"""``model.arch`` -> builder ``(cfg, *, image_size, vocab_size, context_length) -> model``.
Every arch exposes the dual encoder's interface: ``forward(batch, needs) -> Outputs``,
``encode_image(pixels) -> (embeds, tokens)``, ``encode_text(ids, mask) -> (embeds, states)``
and ``logit_scale``, so objectives, training and evaluation work unchanged."""

ARCH_CHECKS: dict[str, Callable[[ModelConfig], None]] = {}
"""``model.arch`` -> a check of ``cfg.arch_kwargs`` (raise ``ValueError`` naming the valid
keys), run by ``validate_model_config`` before any work. An arch without a check takes no
``arch_kwargs``."""


def build_model(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                context_length: int) -> nn.Module:
    """Builds the model ``cfg.arch`` names (random init unless weights are named)."""
    return MODEL_ARCHS.get(cfg.arch)(cfg, image_size=image_size, vocab_size=vocab_size,
                                     context_length=context_length)


@MODEL_ARCHS.register("dual_encoder")
def build_dual_encoder(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                       context_length: int) -> DualEncoder:
    """CLIP's two towers (timm vision, transformers text), optionally with RA-CLIP's module."""
    _check_retrieval(cfg)  # by now ra_ref_dim must be known
    vision = VisionTower(cfg.vision, img_size=image_size, kwargs=cfg.vision_kwargs,
                         weights=cfg.vision_weights)
    text = TextTower(cfg.text, vocab_size=vocab_size, context_length=context_length,
                     weights=cfg.text_weights)
    retrieval = None
    if cfg.ra_layers > 0:
        retrieval = RetrievalAugmentation(cfg.embed_dim, cfg.ra_ref_dim, layers=cfg.ra_layers,
                                          heads=cfg.ra_heads)
    return DualEncoder(vision, text, embed_dim=cfg.embed_dim, pooling=cfg.text_pooling,
                       init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                       init_logit_bias=cfg.init_logit_bias, retrieval=retrieval)


def validate_model_config(cfg: ModelConfig, *, ref_dim_filled_later: bool = False) -> None:
    """Fails fast (before Ray starts) on an unknown timm name or transformers model type, and on
    RA-CLIP fields that cannot build. ``ref_dim_filled_later``: accept ``ra_ref_dim == 0`` with
    ``ra_layers > 0`` because a retrieval stage fills it from its index before the model is
    built (``build_model`` checks it again)."""
    if cfg.arch not in MODEL_ARCHS:
        raise ConfigError(f"model.arch: {cfg.arch!r} is not one of {MODEL_ARCHS.names()}")
    check_arch = ARCH_CHECKS.get(cfg.arch)
    if check_arch is None and cfg.arch_kwargs:
        raise ConfigError(f"model.arch_kwargs: arch {cfg.arch!r} takes none, got "
                          f"{sorted(cfg.arch_kwargs)}")
    if check_arch is not None:
        try:
            check_arch(cfg)
        except ValueError as e:
            raise ConfigError(f"model.arch_kwargs: {e}") from None
    try:
        check_vision_name(cfg.vision)
        check_text_config(cfg.text, cfg.text_weights)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.vision_weights:
        from pathlib import Path

        if not Path(cfg.vision_weights).is_file():
            raise ConfigError(f"model.vision_weights {cfg.vision_weights!r} is not a file")
    _check_retrieval(cfg, ref_dim_filled_later=ref_dim_filled_later)


def _check_retrieval(cfg: ModelConfig, *, ref_dim_filled_later: bool = False) -> None:
    """RA-CLIP fields: off (ra_layers == 0), or a reference width and heads that fit."""
    if cfg.ra_layers < 0:
        raise ConfigError(f"model.ra_layers must be >= 0 (0 = off), got {cfg.ra_layers}")
    if cfg.ra_layers == 0:
        return
    unset_ok = ref_dim_filled_later and cfg.ra_ref_dim == 0
    if cfg.ra_ref_dim <= 0 and not unset_ok:
        raise ConfigError(f"model.ra_layers={cfg.ra_layers} needs model.ra_ref_dim > 0 (the "
                          f"width of the retrieval index's reference embeddings), got "
                          f"{cfg.ra_ref_dim}")
    if cfg.ra_heads <= 0 or cfg.embed_dim % cfg.ra_heads:
        raise ConfigError(f"model.ra_heads={cfg.ra_heads} must be > 0 and divide "
                          f"model.embed_dim={cfg.embed_dim}")


__all__ = ["ARCH_CHECKS", "MODEL_ARCHS", "NN_TEXT_EMBEDS", "DualEncoder", "Outputs",
           "RetrievalAugmentation", "TextTower", "VisionTower", "build_dual_encoder", "build_model",
           "validate_model_config"]
# Importing registers each arch in MODEL_ARCHS (and ARCH_CHECKS).
from vlmray.config import ConfigError
from vlmray.models import clippo as _clippo  # noqa: E402, F401
from vlmray.models import fiber as _fiber  # noqa: E402, F401
from vlmray.models import oner as _oner  # noqa: E402, F401
from vlmray.models import segclip as _segclip  # noqa: E402, F401
