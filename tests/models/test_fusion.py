"""vlmray.models.fusion's one transformer block: both uses (with and without cross-attention)
and loading checkpoints that still carry the self-attention-only block's key names."""

from __future__ import annotations

import pytest
import torch

from vlmray.models.fusion import MultimodalEncoder, TransformerLayer


def test_cross_attention_needs_image_tokens_exactly_when_on() -> None:
    x, image = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    assert TransformerLayer(8, 2, cross=True)(x, None, image).shape == x.shape
    assert TransformerLayer(8, 2)(x).shape == x.shape
    with pytest.raises(ValueError, match="needs image"):
        TransformerLayer(8, 2, cross=True)(x)
    with pytest.raises(ValueError, match="no image"):
        TransformerLayer(8, 2)(x, None, image)
    assert not any("cross" in k or "image" in k for k in TransformerLayer(8, 2).state_dict())


def test_old_self_attention_key_names_still_load() -> None:
    torch.manual_seed(0)
    src = MultimodalEncoder(8, layers=2, heads=2)
    legacy = {k.replace(".norm_self.", ".norm_attn.").replace(".self_attn.", ".attn."): v
              for k, v in src.state_dict().items()}
    assert any(".norm_attn." in k for k in legacy) and any(".attn.in_proj" in k for k in legacy)
    dst = MultimodalEncoder(8, layers=2, heads=2)
    dst.load_state_dict(legacy)                                               # strict
    image, text = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    for a, b in zip(src(image, text), dst(image, text), strict=True):
        assert torch.equal(a, b)
