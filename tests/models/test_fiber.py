"""FIBER (fusion in the backbone): arch checks, unimodal mode = a plain dual encoder (the gate
is never used), fused mode against a float64 reference written from the block equations,
forward outputs (fiber inputs, image-conditioned MLM states), zero-shot evaluation.

    pytest tests/models/test_fiber.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.config import ConfigError, ModelConfig
from vlmray.data import schema
from vlmray.data.tokenize import HashTokenizer
from vlmray.eval import HeldOut, evaluate
from vlmray.models import MODEL_ARCHS, build_model, validate_model_config
from vlmray.models.fiber import FIBER_IMAGE_IN, FIBER_INPUTS, FIBER_TEXT_IN, Fiber, FiberBlock
from vlmray.models.outputs import MLM_STATES

S, V, L = 16, 64, 6          # image side (2 x 2 patches of 8 px + CLS), vocab, context
CV, CT = 32, 24              # vision and text widths differ: the cross-attention's kdim / vdim
TINY_VIT = {"patch_size": 8, "embed_dim": CV, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
TINY_BERT = {"model_type": "bert", "hidden_size": CT, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 48, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


def fiber_config(**arch_kwargs: object) -> ModelConfig:
    kw = {"fusion_layers": 2, "heads": 2, **arch_kwargs}
    return ModelConfig(arch="fiber", arch_kwargs=kw, vision_kwargs=dict(TINY_VIT),
                       text=dict(TINY_BERT), embed_dim=16)


def tiny_fiber(seed: int = 0, alphas: tuple[float, ...] = (0.5, -0.7, 0.9, 0.3),
               double: bool = True) -> Fiber:
    """A 2-block FIBER with open gates (alphas: image blocks then text blocks)."""
    torch.manual_seed(seed)
    model = build_model(fiber_config(), image_size=S, vocab_size=V, context_length=L)
    blocks = [*model.image_blocks, *model.text_blocks]
    with torch.no_grad():
        for block, alpha in zip(blocks, alphas):
            block.alpha.fill_(alpha)
    return model.double() if double else model


def fiber_batch(n: int, seed: int = 0, double: bool = True) -> dict[str, Tensor]:
    """Pixels (float64, or uint8), tokens with 2..L real positions, an MLM copy and labels."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.randn(n, 3, S, S, generator=g, dtype=torch.float64) if double
              else torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8))
    tokens = torch.randint(4, V, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    tokens = tokens * mask
    masked = (torch.rand(n, L, generator=g) < 0.3) & mask.bool()
    masked[:, 1] = True                                   # every row masks >= 1 real token
    return {schema.PIXELS: pixels, schema.TOKENS: tokens, schema.TOKEN_MASK: mask,
            schema.MLM_TOKENS: tokens.masked_fill(masked, 3),
            schema.MLM_LABELS: tokens.masked_fill(~masked, -100)}


# --- arch registration and checks ---------------------------------------------------------------


def test_arch_is_registered_and_checked() -> None:
    assert "fiber" in MODEL_ARCHS.names()
    validate_model_config(fiber_config())
    for bad, match in (({"fusion_layer": 2}, "unknown"), ({"fusion_layers": 0}, "fusion_layers"),
                       ({"heads": 5}, "divide"), ({"mlp_ratio": -1.0}, "mlp_ratio"),
                       ({"init_gate": float("nan")}, "init_gate")):
        with pytest.raises(ConfigError, match=match):
            validate_model_config(fiber_config(**bad))
    with pytest.raises(ConfigError, match="ra_layers"):
        validate_model_config(ModelConfig(arch="fiber", ra_layers=1, ra_ref_dim=8))
    with pytest.raises(ValueError, match="vision 32"):       # 3 divides 24 but not 32
        build_model(fiber_config(heads=3), image_size=S, vocab_size=V, context_length=L)
    model = tiny_fiber()
    assert len(model.image_blocks) == len(model.text_blocks) == 2
    assert model.pair_width == CV + CT
    fresh = build_model(fiber_config(), image_size=S, vocab_size=V, context_length=L)
    assert all(b.alpha.item() == 0.0 for b in [*fresh.image_blocks, *fresh.text_blocks])
    opened = build_model(fiber_config(init_gate=0.5), image_size=S, vocab_size=V,
                         context_length=L)
    assert all(b.alpha.item() == 0.5 for b in [*opened.image_blocks, *opened.text_blocks])


# --- unimodal and fused modes -------------------------------------------------------------------


def test_unimodal_mode_never_uses_the_gate() -> None:
    """encode_image / encode_text do not change when the gates (alpha) move: ITC and zero-shot
    see a plain dual encoder whose embedding comes after the K blocks."""
    model, b = tiny_fiber(), fiber_batch(4)
    img, img_tok = model.encode_image(b[schema.PIXELS], tokens=True)
    txt, txt_tok = model.encode_text(b[schema.TOKENS], b[schema.TOKEN_MASK])
    with torch.no_grad():
        for block in [*model.image_blocks, *model.text_blocks]:
            block.alpha.add_(1.0)
    torch.testing.assert_close(model.encode_image(b[schema.PIXELS])[0], img)
    torch.testing.assert_close(model.encode_text(b[schema.TOKENS], b[schema.TOKEN_MASK])[1],
                               txt_tok)
    assert img.shape == txt.shape == (4, 16) and img_tok.shape == (4, 5, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    blocks_off = model.vision.trunk.forward_head(model.image_inputs(b[schema.PIXELS]),
                                                 pre_logits=True)
    assert not torch.allclose(F.normalize(model.image_proj(blocks_off), dim=-1), img)


def test_closed_gate_fuse_equals_unimodal() -> None:
    model, b = tiny_fiber(alphas=(0.0,) * 4), fiber_batch(4)
    image_in = model.image_inputs(b[schema.PIXELS])
    text_in = model.text_inputs(b[schema.TOKENS], b[schema.TOKEN_MASK])
    x, y = model.fuse(image_in, text_in, b[schema.TOKEN_MASK])
    torch.testing.assert_close(x, model.image_stream(image_in))
    torch.testing.assert_close(y, model.text_stream(text_in, b[schema.TOKEN_MASK]))


def _attention(mha: nn.MultiheadAttention, q_in: Tensor, kv_in: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out: q_in (S, C), kv_in (S', C') -> (S, C)."""
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    h = mha.num_heads
    q, k, v = ((x @ w.T + bias).view(x.shape[0], h, -1).transpose(0, 1)
               for x, w, bias in ((q_in, wq, bq), (kv_in, wk, bk), (kv_in, wv, bv)))
    weights = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)   # (h, S, S')
    heads = (weights @ v).transpose(0, 1).reshape(q_in.shape[0], -1)          # (S, C)
    return heads @ mha.out_proj.weight.T + mha.out_proj.bias


def _ln(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_fuse(model: Fiber, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One pair, padding cut off: x (N, C_v) image, y (l, C_t) real text tokens."""
    def self_attn(blk: FiberBlock, s: Tensor) -> Tensor:
        h = _ln(blk.norm_self, s)
        return s + _attention(blk.self_attn, h, h)

    def cross(blk: FiberBlock, s: Tensor, other: Tensor) -> Tensor:
        return s + math.tanh(blk.alpha.item()) * _attention(
            blk.cross_attn, _ln(blk.norm_cross, s), _ln(blk.norm_other, other))

    def mlp(blk: FiberBlock, s: Tensor) -> Tensor:
        lin1, lin2 = blk.mlp[0], blk.mlp[2]
        h = _ln(blk.norm_mlp, s) @ lin1.weight.T + lin1.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))                      # exact GELU
        return s + h @ lin2.weight.T + lin2.bias

    for bi, bt in zip(model.image_blocks, model.text_blocks):
        x, y = self_attn(bi, x), self_attn(bt, y)
        x, y = cross(bi, x, y), cross(bt, y, x)
        x, y = mlp(bi, x), mlp(bt, y)
    return _ln(model.image_norm, x), _ln(model.text_norm, y)


def test_fuse_matches_reference_and_ignores_padding() -> None:
    model, b = tiny_fiber(), fiber_batch(4, seed=3)
    mask = b[schema.TOKEN_MASK]
    image_in = model.image_inputs(b[schema.PIXELS])
    text_in = model.text_inputs(b[schema.TOKENS], mask)
    x, y = model.fuse(image_in, text_in, mask)
    assert x.shape == image_in.shape and y.shape == text_in.shape
    for i in range(4):
        n = int(mask[i].sum())
        want_x, want_y = reference_fuse(model, image_in[i], text_in[i, :n])
        torch.testing.assert_close(x[i], want_x, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y[i, :n], want_y, rtol=1e-10, atol=1e-10)
    noisy = text_in.masked_fill(~mask.bool()[..., None], 5.0)       # padding must not matter
    x2, y2 = model.fuse(image_in, noisy, mask)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(y2[mask.bool()], y[mask.bool()])
    with pytest.raises(ValueError, match="fuse"):
        model.fuse(image_in, text_in, mask[:, :3])


# --- forward ------------------------------------------------------------------------------------


def test_forward_outputs_fiber_inputs_and_fused_mlm_states() -> None:
    model, b = tiny_fiber(), fiber_batch(3)
    needs = {FIBER_INPUTS, MLM_STATES, "image_tokens", "text_tokens"}
    out = model(b, needs)
    image_in, text_in = out.extra[FIBER_IMAGE_IN], out.extra[FIBER_TEXT_IN]
    assert image_in.shape == (3, 5, CV) and text_in.shape == (3, L, CT)
    torch.testing.assert_close(out.image_embeds, model.encode_image(b[schema.PIXELS])[0])
    torch.testing.assert_close(out.text_embeds, model.encode_text(b[schema.TOKENS],
                                                                  b[schema.TOKEN_MASK])[0])
    assert torch.equal(out.text_mask, b[schema.TOKEN_MASK])
    assert out.image_tokens.shape == (3, 5, 16) and out.text_tokens.shape == (3, L, 16)
    mlm_in = model.text_inputs(b[schema.MLM_TOKENS], b[schema.TOKEN_MASK])
    want = model.fuse(image_in, mlm_in, b[schema.TOKEN_MASK])[1]
    torch.testing.assert_close(out.extra[MLM_STATES], want)
    # the MLM states are conditioned on the image; the plain text embedding is not
    other = {**b, schema.PIXELS: b[schema.PIXELS].flip(0)}
    out2 = model(other, needs)
    assert not torch.allclose(out2.extra[MLM_STATES], out.extra[MLM_STATES])
    torch.testing.assert_close(out2.text_embeds, out.text_embeds)
    plain = model(b, ())
    assert plain.extra == {} and plain.image_tokens is None and plain.text_tokens is None
    with pytest.raises(ValueError, match="mlm_tokens"):
        model({k: v for k, v in b.items() if k != schema.MLM_TOKENS}, {MLM_STATES})
    with pytest.raises(ValueError, match="refs"):
        model.encode_image(b[schema.PIXELS], refs=(b[schema.PIXELS],) * 3)


def test_zero_shot_evaluation_runs_as_a_dual_encoder() -> None:
    model = tiny_fiber(double=False)
    b = fiber_batch(9, double=False)
    classnames = ["red circle", "blue square", "green triangle"]
    data = HeldOut(pixels=b[schema.PIXELS], tokens=b[schema.TOKENS],
                   token_mask=b[schema.TOKEN_MASK], labels=torch.arange(9) % 3,
                   classnames=classnames, templates=["a {}."])
    metrics = evaluate(model, data, HashTokenizer(vocab_size=V, context_length=L), batch_size=4)
    assert metrics["zero_shot_chance"] == pytest.approx(1 / 3)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())
