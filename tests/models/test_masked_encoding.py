"""MAE-style masked encoding: ``VisionTower.forward_masked`` against a by-hand removal of the
masked tokens, masked pixels not influencing it, the dual encoder's ``masked_*_tokens`` extras
(only when needed, clear errors without their columns), and ``vlmray.models.mae`` (patchify
round trip, exact random masks, sin-cos positions, decoder shapes and mask-token use).

    pytest tests/models/test_masked_encoding.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlmray.config import ModelConfig
from vlmray.data import schema
from vlmray.models import DualEncoder, build_model
from vlmray.models.mae import MAEDecoder, patchify, random_patch_mask, sincos_2d, unpatchify
from vlmray.models.outputs import MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS, MLM_STATES
from vlmray.models.towers import VisionTower

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, S, P, V, L = 3, 32, 8, 128, 8
TINY_VIT = {"patch_size": P, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64}


def tower(seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    return VisionTower("vit_tiny_patch16_224", img_size=S, kwargs=dict(TINY_VIT)).eval()


def pixels(n: int = B, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)


def by_hand(vt: VisionTower, px: Tensor, mask: Tensor) -> Tensor:
    """One row at a time: embed, add positions, keep CLS + the listed visible patches, run
    every block and the norm; the visible patches' states (B, N_vis, C)."""
    trunk, rows = vt.trunk, []
    for i in range(px.shape[0]):
        x = trunk._pos_embed(trunk.patch_embed(vt.normalise(px[i:i + 1])))   # (1, 1 + N, C)
        keep = [0] + [1 + n for n in range(mask.shape[1]) if not bool(mask[i, n])]
        x = x[:, keep]
        for block in trunk.blocks:
            x = block(x)
        rows.append(trunk.norm(x)[0, 1:])
    return torch.stack(rows)


def test_forward_masked_equals_removing_tokens_by_hand() -> None:
    vt, px = tower(), pixels()
    assert vt.patch_grid == (4, 4, P)
    mask = random_patch_mask(B, 16, 0.75, torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = vt.forward_masked(px, mask)
        want = by_hand(vt, px, mask)
    assert got.shape == (B, 4, vt.width)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # nothing masked: the trunk's own patch features
        full = vt.forward_masked(px, torch.zeros(B, 16, dtype=torch.bool))
        plain = vt.trunk.forward_features(vt.normalise(px))[:, 1:]
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)


def test_masked_pixels_do_not_influence_output() -> None:
    vt, px = tower(), pixels()
    mask = random_patch_mask(B, 16, 0.5, torch.Generator().manual_seed(2))
    pix_mask = unpatchify(mask[..., None].expand(-1, -1, P * P * 3).float(), 4, 4, P).bool()
    noise = pixels(seed=9)
    scrambled = torch.where(pix_mask, noise, px)
    assert not torch.equal(scrambled, px)
    with torch.no_grad():
        torch.testing.assert_close(vt.forward_masked(scrambled, mask), vt.forward_masked(px, mask),
                                   rtol=0, atol=0)
        # ... while a visible pixel does change it
        changed = torch.where(~pix_mask, noise, px)
        assert not torch.allclose(vt.forward_masked(changed, mask), vt.forward_masked(px, mask))


def test_forward_masked_errors() -> None:
    vt = tower()
    with pytest.raises(ValueError, match="same number"):
        vt.forward_masked(pixels(2), torch.tensor([[True] + [False] * 15, [False] * 16]))
    with pytest.raises(ValueError, match="bool"):
        vt.forward_masked(pixels(2), torch.zeros(2, 15, dtype=torch.bool))
    cnn = VisionTower("resnet18", img_size=S, kwargs={})
    assert cnn.patch_grid is None
    with pytest.raises(ValueError, match="ViT"):
        cnn.forward_masked(pixels(1), torch.zeros(1, 16, dtype=torch.bool))


def test_patchify_round_trip_and_layout() -> None:
    px = pixels(2)
    patches = patchify(px, P)
    assert patches.shape == (2, 16, P * P * 3) and patches.dtype == torch.float32
    assert 0.0 <= patches.min() and patches.max() <= 1.0
    torch.testing.assert_close(unpatchify(patches, 4, 4, P), px.float() / 255, rtol=0, atol=0)
    # patch n = (row n // 4, column n % 4), laid out (pixel row, pixel column, channel)
    torch.testing.assert_close(patches[1, 6].view(P, P, 3),
                               px[1, :, P:2 * P, 2 * P:3 * P].permute(1, 2, 0).float() / 255)
    floats = torch.randn(2, 3, S, S)
    torch.testing.assert_close(unpatchify(patchify(floats, P), 4, 4, P), floats)
    with pytest.raises(ValueError, match="divide"):
        patchify(px, 5)


def test_random_patch_mask_exact_and_reproducible() -> None:
    for ratio, n, want in ((0.75, 16, 12), (0.4, 16, 6), (0.4, 196, 78), (0.5, 7, 4)):
        mask = random_patch_mask(64, n, ratio, torch.Generator().manual_seed(0))
        assert mask.dtype == torch.bool and mask.shape == (64, n)
        assert (mask.sum(1) == want).all()
    a = random_patch_mask(32, 16, 0.75, torch.Generator().manual_seed(3))
    b = random_patch_mask(32, 16, 0.75, torch.Generator().manual_seed(3))
    c = random_patch_mask(32, 16, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) > 16           # rows differ
    freq = random_patch_mask(4000, 16, 0.25, torch.Generator().manual_seed(5)).double().mean(0)
    torch.testing.assert_close(freq, torch.full((16,), 0.25, dtype=torch.float64), atol=0.03,
                               rtol=0)


def test_sincos_positions() -> None:
    pos = sincos_2d(3, 4, 8)
    assert pos.shape == (12, 8)
    # first half: the row; second half: the column; position 0 is (sin 0, cos 0) = (0, 1)
    torch.testing.assert_close(pos[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    torch.testing.assert_close(pos[5, 4:], pos[1, 4:])        # same column, rows 1 and 0
    torch.testing.assert_close(pos[5, :4], pos[4, :4])        # same row, columns 1 and 0
    assert torch.tensor(1.0).sin().item() == pytest.approx(pos[5, 0].item())
    assert len({tuple(r.tolist()) for r in pos}) == 12


def test_mae_decoder_shapes_and_mask_token() -> None:
    torch.manual_seed(0)
    dec = MAEDecoder(16, (4, 4), P, layers=1, heads=2).double()
    mask = random_patch_mask(2, 16, 0.75, torch.Generator().manual_seed(0))
    vis = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    out = dec(vis, mask)
    assert out.shape == (2, 16, P * P * 3)
    out[mask].sum().backward()          # masked predictions depend on the mask token
    assert dec.mask_token.grad.abs().sum() > 0 and vis.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="visible"):
        dec(torch.randn(2, 5, 16, dtype=torch.float64), mask)
    with pytest.raises(ValueError, match="divisible"):
        MAEDecoder(18, (4, 4), P, heads=3)


# --- the dual encoder's masked extras ----------------------------------------------------------


def model() -> DualEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vision_kwargs=dict(TINY_VIT), text=dict(TINY_BERT), embed_dim=16)
    return build_model(cfg, image_size=S, vocab_size=V, context_length=L).eval()


def batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, L), generator=g)
    mask = (torch.arange(L) < torch.tensor([L, 5, 3])[:, None]).long()
    return {schema.PIXELS: pixels(), schema.TOKENS: ids * mask, schema.TOKEN_MASK: mask,
            schema.MLM_TOKENS: torch.where(torch.rand(B, L, generator=g) < 0.3, 4, ids) * mask,
            schema.PATCH_MASK: random_patch_mask(B, 16, 0.75, g)}


def test_dual_encoder_masked_extras_only_when_needed() -> None:
    m, b = model(), batch()
    with torch.no_grad():
        plain = m(b, {"image_tokens"})
        assert MASKED_IMAGE_TOKENS not in plain.extra and MASKED_TEXT_TOKENS not in plain.extra
        out = m(b, {MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS})
        img = out.extra[MASKED_IMAGE_TOKENS]
        txt = out.extra[MASKED_TEXT_TOKENS]
        assert img.shape == (B, 4, 16) and txt.shape == (B, L, 16)
        torch.testing.assert_close(img, m.image_proj(m.vision.forward_masked(
            b[schema.PIXELS], b[schema.PATCH_MASK])))
        torch.testing.assert_close(txt, m.text_proj(m.text(b[schema.MLM_TOKENS],
                                                           b[schema.TOKEN_MASK])))
        both = m(b, {MLM_STATES, MASKED_TEXT_TOKENS})     # one text pass serves both
        torch.testing.assert_close(both.extra[MASKED_TEXT_TOKENS],
                                   m.text_proj(both.extra[MLM_STATES]))
        torch.testing.assert_close(both.extra[MASKED_TEXT_TOKENS], txt)
        # the unmasked outputs are unchanged by the extras
        torch.testing.assert_close(out.image_embeds, plain.image_embeds)


def test_dual_encoder_masked_extras_errors() -> None:
    m, b = model(), batch()
    no_mask = {k: v for k, v in b.items() if k != schema.PATCH_MASK}
    with pytest.raises(ValueError, match="patch_mask"):
        m(no_mask, {MASKED_IMAGE_TOKENS})
    no_mlm = {k: v for k, v in b.items() if k != schema.MLM_TOKENS}
    with pytest.raises(ValueError, match="mlm_tokens.*mlm_prob"):
        m(no_mlm, {MASKED_TEXT_TOKENS})
    m(no_mask, {MASKED_TEXT_TOKENS})       # each extra asks only for its own columns
    m(no_mlm, {MASKED_IMAGE_TOKENS})
