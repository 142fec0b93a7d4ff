"""Models: towers, the dual encoder, and the factory that builds them from a ModelConfig."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmray.models.dual_encoder import DualEncoder
from vlmray.models.outputs import Outputs
from vlmray.models.towers import (
    TextTower,
    VisionTower,
    check_text_config,
    check_vision_name,
)

if TYPE_CHECKING:
    from vlmray.config import ModelConfig


def build_model(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                context_length: int) -> DualEncoder:
    """Builds the dual encoder described by ``cfg`` (random init unless weights are named)."""
    vision = VisionTower(cfg.vision, img_size=image_size, kwargs=cfg.vision_kwargs,
                         weights=cfg.vision_weights)
    text = TextTower(cfg.text, vocab_size=vocab_size, context_length=context_length,
                     weights=cfg.text_weights)
    return DualEncoder(vision, text, embed_dim=cfg.embed_dim, pooling=cfg.text_pooling,
                       init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale)


def validate_model_config(cfg: ModelConfig) -> None:
    """Fails fast (before Ray starts) on an unknown timm name or transformers model type."""
    from vlmray.config import ConfigError

    try:
        check_vision_name(cfg.vision)
        check_text_config(cfg.text, cfg.text_weights)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.vision_weights:
        from pathlib import Path

        if not Path(cfg.vision_weights).is_file():
            raise ConfigError(f"model.vision_weights {cfg.vision_weights!r} is not a file")


__all__ = ["DualEncoder", "Outputs", "TextTower", "VisionTower", "build_model",
           "validate_model_config"]
