"""Encoder towers: any timm vision model, any transformers text encoder; built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmray.config.errors import unknown_message

_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    """A timm backbone without its classifier: pixels (B, 3, H, W) -> pooled (B, C)."""

    def __init__(self, name: str, *, img_size: int, kwargs: dict[str, Any],
                 weights: str = "") -> None:
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

    def forward_masked(self, pixels: Tensor, patch_mask: Tensor) -> Tensor:
        """MAE-style encoding of the visible patches only (He et al., 2022).

        pixels (B, 3, H, W); patch_mask bool (B, N), True = masked, row-major over the grid,
        every row masking the same count. The patches are embedded and get their position
        embeddings (and the prefix tokens, e.g. CLS), the masked ones are dropped, and the
        blocks and final norm run over prefix + visible tokens. Returns the visible patches'
        states (B, N_vis, C) in ascending patch order (prefix tokens dropped).
        """
        trunk = self.trunk
        if self.patch_grid is None or not all(hasattr(trunk, a) for a in
                                              ("_pos_embed", "blocks", "norm")):
            raise ValueError(f"forward_masked needs a ViT vision tower with patches; "
                             f"{type(trunk).__name__} has none")
        x = trunk.patch_embed(self.normalise(pixels))
        x = trunk._pos_embed(x.reshape(x.shape[0], -1, x.shape[-1]))     # (B, P + N, C)
        prefix = int(getattr(trunk, "num_prefix_tokens", 0))
        keep = visible_index(patch_mask, x.shape[0], x.shape[1] - prefix)  # (B, N_vis)
        patches = x[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat((x[:, :prefix], patches), dim=1)                    # (B, P + N_vis, C)
        x = trunk.norm(trunk.blocks(trunk.norm_pre(x)))
        return x[:, prefix:]


def visible_index(patch_mask: Tensor, batch: int, n_patches: int) -> Tensor:
    """Indices (B, N_vis) of the unmasked patches of ``patch_mask`` (B, N) bool, ascending per
    row; a clear error when the shape is wrong or rows mask different counts."""
    if patch_mask.shape != (batch, n_patches) or patch_mask.dtype != torch.bool:
        raise ValueError(f"patch_mask must be bool (B, N_patches) = ({batch}, {n_patches}), got "
                         f"{patch_mask.dtype} {tuple(patch_mask.shape)}")
    visible = (~patch_mask).sum(dim=1)
    if batch and bool((visible != visible[0]).any()):
        raise ValueError(f"patch_mask rows must mask the same number of patches; visible counts "
                         f"{visible.tolist()}")
    return torch.nonzero(~patch_mask)[:, 1].view(batch, -1)             # row-major -> ascending


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


__all__ = ["TextTower", "VisionTower", "check_text_config", "check_vision_name", "visible_index"]
