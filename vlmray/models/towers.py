"""Encoder towers: any timm vision model, any transformers text encoder; built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmray._registry import unknown_message

_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    """A timm backbone without its classifier: pixels (B, 3, H, W) -> pooled (B, C)."""

    def __init__(self, name: str, *, img_size: int, kwargs: dict[str, Any], weights: str = "") -> None:
        super().__init__()
        self.trunk = _create_timm(name, img_size, kwargs)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k.removeprefix("trunk."): v for k, v in state.get("state_dict", state).items()}
            missing = self.trunk.load_state_dict(state, strict=False).missing_keys
            if missing:  # extra keys (a classifier head) are fine; absent trunk weights are not
                raise ValueError(f"vision_weights {weights!r} lacks {len(missing)} of the "
                                 f"trunk's tensors, e.g. {missing[:3]}")
        self.width: int = self.trunk.num_features
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_grid(self) -> tuple[int, int, int] | None:
        """(grid_h, grid_w, patch) of a ViT trunk (square patches), else None (CNNs)."""
        embed = getattr(self.trunk, "patch_embed", None)
        grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
        if grid is None or patch is None:
            return None
        return int(grid[0]), int(grid[1]), int(patch[0])

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> float, standardised; float input passes through."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float().div_(255.0).sub_(self.mean).div_(self.std)
        return pixels

    def forward(self, pixels: Tensor, *, tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        feats = self.trunk.forward_features(self.normalise(pixels))   # (B, N, C) or (B, C, h, w)
        pooled = self.trunk.forward_head(feats, pre_logits=True)       # (B, C)
        if not tokens:
            return pooled, None
        if feats.ndim == 4:                                            # CNN maps -> tokens
            feats = feats.flatten(2).transpose(1, 2)
        return pooled, feats


def _create_timm(name: str, img_size: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    except TypeError as e:  # CNNs take any input size and reject img_size
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class TextTower(nn.Module):
    """A transformers encoder: ids (B, L) + mask (B, L) -> token states (B, L, C)."""

    def __init__(self, config: dict[str, Any], *, vocab_size: int, context_length: int,
                 weights: str = "") -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if weights:
            self.encoder = _model_from_pretrained(AutoModel, weights)
        else:
            cfg = dict(config)
            model_type = cfg.pop("model_type")
            cfg.setdefault("max_position_embeddings", max(64, context_length))
            hf_cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=0, **cfg)
            self.encoder = _model_from_config(AutoModel, hf_cfg)
        self.width: int = self.encoder.config.hidden_size

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


def _model_from_config(auto: Any, hf_cfg: Any) -> nn.Module:
    try:  # a pooler we never use would leave parameters without gradients under DDP
        return auto.from_config(hf_cfg, add_pooling_layer=False)
    except TypeError:
        return auto.from_config(hf_cfg)


def _model_from_pretrained(auto: Any, path: str) -> nn.Module:
    try:  # no unused pooler (see _model_from_config)
        return auto.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    except TypeError:
        return auto.from_pretrained(path, local_files_only=True)


def check_vision_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ValueError(unknown_message("timm model", name, timm.list_models(), limit=20))


def check_text_config(config: dict[str, Any], weights: str) -> None:
    from transformers import CONFIG_MAPPING

    if weights:
        if not Path(weights).is_dir():
            raise ValueError(f"model.text_weights {weights!r} is not a local directory")
        return
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(unknown_message("transformers model_type", str(model_type),
                                         sorted(CONFIG_MAPPING.keys()), limit=30))


__all__ = ["TextTower", "VisionTower", "check_text_config", "check_vision_name"]
