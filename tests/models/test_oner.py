"""OneR's single tower: shapes, one set of encoder weights for both modalities, the mixed inputs'
construction (which tokens go where, masks), the builder and the dual encoder's interface.

    pytest tests/models/test_oner.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import MODEL_ARCHS, build_model
from vlmray.models.oner import (
    ONER_MIXED_EMBEDS,
    ONER_PAIRED_EMBEDS,
    ONER_PARTNER,
    OneR,
    mix_partner,
)
from vlmray.objectives import ObjectiveMix

B, S, P, V, L, D = 4, 32, 8, 512, 16, 16
N_PATCH = (S // P) ** 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64}
MIXES = {ONER_MIXED_EMBEDS, ONER_PAIRED_EMBEDS}


def make(seed: int = 0, **kw: object) -> OneR:
    cfg = ModelConfig(**{"arch": "oner", "vision_kwargs": {"patch_size": P}, "text": dict(TEXT),
                         "embed_dim": D, **kw})
    torch.manual_seed(seed)
    return build_model(cfg, image_size=S, vocab_size=V, context_length=L).eval()


def batch(n: int = B, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 5, 9, 3, 12][:n])
    mask = (torch.arange(L) < lengths[:, None]).long()                 # (n, L) varied lengths
    ids = torch.randint(3, V, (n, L), generator=g) * mask              # padding = 0
    return {schema.PIXELS: torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
            schema.TOKENS: ids, schema.TOKEN_MASK: mask}


def test_registered_and_shaped_from_config() -> None:
    assert "oner" in MODEL_ARCHS.names()
    model = make()
    assert isinstance(model, OneR) and model.width == 32 and model.patch_size == P
    assert len(model.encoder.layers) == 2 and model.proj.out_features == D
    assert model.encoder.layers[0].linear1.out_features == 64
    assert model.image_pos.shape == (N_PATCH, 32) and model.text_pos.shape == (L, 32)
    assert model.logit_bias is None and make(init_logit_bias=-10.0).logit_bias.item() == -10.0
    # one encoder: no per-modality transformer anywhere in the state dict
    assert not any(k.startswith(("vision.", "text.")) for k in model.state_dict())


def test_forward_shapes_and_norms() -> None:
    model, b = make(), batch()
    with torch.no_grad():
        out = model(b, {"image_tokens", "text_tokens", *MIXES})
    for emb in (out.image_embeds, out.text_embeds, out.extra[ONER_MIXED_EMBEDS],
                out.extra[ONER_PAIRED_EMBEDS]):
        assert emb.shape == (B, D)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
    assert out.image_tokens.shape == (B, 1 + N_PATCH, D)               # [CLS] first
    assert out.text_tokens.shape == (B, L, D) and out.text_mask is b[schema.TOKEN_MASK]
    assert out.extra[ONER_PARTNER].tolist() == [1, 2, 3, 0]
    assert out.logit_scale.item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        plain = model(b)
    assert plain.image_tokens is None and plain.text_tokens is None and plain.extra == {}
    torch.testing.assert_close(plain.image_embeds, out.image_embeds)
    # the [CLS] state of image_tokens is the (unnormalised) image embedding
    torch.testing.assert_close(F.normalize(out.image_tokens[:, 0], dim=-1), out.image_embeds)


def test_both_modalities_run_through_the_same_encoder_parameters() -> None:
    model, b = make(), batch()
    shared = {n for n, _ in model.named_parameters()
              if n.startswith(("encoder.", "norm.", "proj.", "cls"))}
    touched = {}
    for name, emb in (("image", lambda: model.encode_image(b[schema.PIXELS])[0]),
                      ("text", lambda: model.encode_text(b[schema.TOKENS],
                                                         b[schema.TOKEN_MASK])[0])):
        model.zero_grad(set_to_none=True)
        emb().pow(3).sum().backward()
        touched[name] = {n for n, p in model.named_parameters()
                         if p.grad is not None and p.grad.abs().sum() > 0}
    assert shared <= touched["image"] and shared <= touched["text"]
    assert touched["image"] - shared == {"patch_embed.weight", "patch_embed.bias", "image_pos"}
    assert touched["text"] - shared == {"token_embed.weight", "text_pos"}


def _manual(model: OneR, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """[CLS; patches + pos^I; tokens + pos^T] written out by hand, through the shared layers."""
    x = pixels.float().div(255.0).sub(model.mean).div(model.std)
    patches = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=P)
    patches = patches.flatten(2).transpose(1, 2) + model.image_pos     # (n, 16, C)
    words = model.token_embed.weight[ids] + model.text_pos[: ids.shape[1]]
    seq = torch.cat([model.cls.expand(len(ids), 1, -1), patches, words], dim=1)
    pad = torch.cat([torch.zeros(len(ids), 1 + N_PATCH, dtype=torch.bool), mask == 0], dim=1)
    for layer in model.encoder.layers:
        seq = layer(seq, src_key_padding_mask=pad)
    return F.normalize(model.proj(model.norm(seq[:, 0])), dim=-1)


def test_mixed_inputs_carry_own_image_and_partner_caption() -> None:
    model, b = make(), batch()
    pixels, ids, mask = b[schema.PIXELS], b[schema.TOKENS], b[schema.TOKEN_MASK]
    with torch.no_grad():
        out = model(b, MIXES)
        pi = mix_partner(B)
        torch.testing.assert_close(out.extra[ONER_MIXED_EMBEDS],
                                   _manual(model, pixels, ids[pi], mask[pi]))
        torch.testing.assert_close(out.extra[ONER_PAIRED_EMBEDS],
                                   _manual(model, pixels, ids, mask))
        # row i's mix: image i and caption pi(i) = i + 1; a new caption for row 2 changes
        # only row 1's mix (and row 2's in-context pair)
        ids2 = ids.clone()
        ids2[2, :3] = (ids2[2, :3] - 2) % (V - 3) + 3          # each id + 1, in range
        out2 = model({**b, schema.TOKENS: ids2}, MIXES)
        changed = (out2.extra[ONER_MIXED_EMBEDS] - out.extra[ONER_MIXED_EMBEDS]).abs().sum(1)
        assert (changed > 1e-6).tolist() == [False, True, False, False]
        changed = (out2.extra[ONER_PAIRED_EMBEDS] - out.extra[ONER_PAIRED_EMBEDS]).abs().sum(1)
        assert (changed > 1e-6).tolist() == [False, False, True, False]


def test_padding_is_masked_in_every_sequence() -> None:
    model, b = make(), batch()
    noisy = b[schema.TOKENS].clone()
    noisy[b[schema.TOKEN_MASK] == 0] = 7                               # garbage in the padding
    with torch.no_grad():
        out = model(b, MIXES)
        out2 = model({**b, schema.TOKENS: noisy}, MIXES)
    for a, c in ((out.text_embeds, out2.text_embeds),
                 *((out.extra[k], out2.extra[k]) for k in MIXES)):
        torch.testing.assert_close(a, c)


def test_only_requested_mixes_are_built() -> None:
    model, b = make(), batch()
    with torch.no_grad():
        only_paired = model(b, {ONER_PAIRED_EMBEDS})
        both = model(b, MIXES)
    assert set(only_paired.extra) == {ONER_PAIRED_EMBEDS, ONER_PARTNER}
    torch.testing.assert_close(only_paired.extra[ONER_PAIRED_EMBEDS],
                               both.extra[ONER_PAIRED_EMBEDS])


def test_builder_and_interface_errors() -> None:
    with pytest.raises(ValueError, match="must divide hidden_size"):
        make(text={**TEXT, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="lacks"):
        make(text={"model_type": "bert", "hidden_size": 32})
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        make(vision_kwargs={"patch_size": 5})
    with pytest.raises(ValueError, match="no retrieval"):
        make().encode_image(batch()[schema.PIXELS], refs=(torch.zeros(1),) * 3)
    with pytest.raises(ValueError, match="mlm_states"):
        make()(batch(), {"mlm_states"})


def test_clip_and_oner_objectives_train_it() -> None:
    """The dual encoder's consumers work unchanged: CLIP's loss and OneR's, one step each."""
    model, b = make().train(), batch()
    for spec in (ObjectiveSpec(name="clip"), ObjectiveSpec(name="oner")):
        mix = ObjectiveMix.from_specs([spec])
        model.zero_grad(set_to_none=True)
        result = mix(b, model(b, mix.needs), Dist())
        result.loss.backward()
        assert torch.isfinite(result.loss)
        assert all(p.grad is not None for n, p in model.named_parameters()
                   if n != "logit_bias"), spec.name
