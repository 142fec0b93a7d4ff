"""The dual encoder: embeddings, logit scale, token features, towers, pooling, local weights.

    pytest tests/models/test_dual_encoder.py -q
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import DualEncoder, build_model
from vlmray.objectives import ObjectiveMix

B, S, V, L = 3, 32, 512, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64}


def tiny(**kw: object) -> ModelConfig:
    return ModelConfig(**{"vision_kwargs": dict(TINY_VIT), "text": dict(TINY_BERT),
                          "embed_dim": 16, **kw})


def make(cfg: ModelConfig, seed: int = 0, image_size: int = S) -> DualEncoder:
    torch.manual_seed(seed)
    return build_model(cfg, image_size=image_size, vocab_size=V, context_length=L).eval()


def batch(n: int = B, image_size: int = S, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, L), generator=g)
    lengths = torch.tensor([L, 5, 9, 3, 12][:n])
    mask = (torch.arange(L) < lengths[:, None]).long()             # (n, L), varied lengths
    ids[:, 0] = 1
    ids = ids * mask                                                # padding = 0
    return {schema.PIXELS: torch.randint(0, 256, (n, 3, image_size, image_size), generator=g,
                                         dtype=torch.uint8),
            schema.TOKENS: ids, schema.TOKEN_MASK: mask}


@pytest.fixture(scope="module")
def default_model() -> DualEncoder:
    return make(ModelConfig())


def test_default_model_embeddings_and_scale(default_model: DualEncoder) -> None:
    with torch.no_grad():
        out = default_model(batch())
    D = ModelConfig().embed_dim
    assert out.image_embeds.shape == out.text_embeds.shape == (B, D)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(B))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert out.image_tokens is None and out.text_tokens is None and out.text_mask is None
    assert not torch.allclose(out.image_embeds[0], out.image_embeds[1])


def test_logit_scale_is_clamped() -> None:
    model = make(tiny(init_temperature=0.5, max_logit_scale=20.0))
    assert model.logit_scale.item() == pytest.approx(2.0, rel=1e-6)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale.item() == pytest.approx(20.0, rel=1e-6)
    model.logit_scale.backward()
    assert model.log_logit_scale.grad.item() == 0.0                 # no push past the clamp


def test_token_features(default_model: DualEncoder) -> None:
    b = batch()
    with torch.no_grad():
        out = default_model(b, needs={"image_tokens", "text_tokens"})
        plain = default_model(b)
    D, trunk = ModelConfig().embed_dim, default_model.vision.trunk
    patches = (S // ModelConfig().vision_kwargs["patch_size"]) ** 2
    # timm's forward_features keeps the prefix (CLS) token: N_img = prefix + patches.
    assert out.image_tokens.shape == (B, trunk.num_prefix_tokens + patches, D)
    assert out.text_tokens.shape == (B, L, D)
    assert torch.equal(out.text_mask, b[schema.TOKEN_MASK])
    torch.testing.assert_close(out.image_embeds, plain.image_embeds)
    torch.testing.assert_close(out.text_embeds, plain.text_embeds)


def test_timm_cnn_vision_tower() -> None:
    model = make(tiny(vision="resnet10t", vision_kwargs={}), image_size=64)
    assert model.vision.width == 512
    with torch.no_grad():
        out = model(batch(image_size=64), needs={"image_tokens"})
    assert out.image_embeds.shape == (B, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(B))
    assert out.image_tokens.shape == (B, (64 // 32) ** 2, 16)       # stride-32 map, flattened


def test_text_pooling_first_vs_mean() -> None:
    mean, first = make(tiny(text_pooling="mean")), make(tiny(text_pooling="first"))
    first.load_state_dict(mean.state_dict())
    b = batch()
    with torch.no_grad():
        states = mean.text(b[schema.TOKENS], b[schema.TOKEN_MASK])  # (B, L, C)
        m = b[schema.TOKEN_MASK].unsqueeze(-1).float()
        ref_mean = F.normalize(mean.text_proj((states * m).sum(1) / m.sum(1)), dim=-1)
        ref_first = F.normalize(mean.text_proj(states[:, 0]), dim=-1)
        got_mean, got_first = mean(b).text_embeds, first(b).text_embeds
    torch.testing.assert_close(got_mean, ref_mean)
    torch.testing.assert_close(got_first, ref_first)
    assert (got_mean - got_first).abs().max() > 1e-3


def test_mean_pooling_ignores_padding() -> None:
    model = make(tiny())
    b = batch()
    other = dict(b)
    other[schema.TOKENS] = torch.where(b[schema.TOKEN_MASK].bool(), b[schema.TOKENS],
                                       torch.full_like(b[schema.TOKENS], 7))
    with torch.no_grad():
        torch.testing.assert_close(model(b).text_embeds, model(other).text_embeds)


def _clip_grads(model: DualEncoder) -> list[str]:
    """Names of trainable parameters left without a gradient by one CLIP loss backward."""
    model.train()
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip")])
    b = batch()
    mix(b, model(b, mix.needs), Dist()).loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_every_parameter_gets_a_gradient() -> None:
    """DDP (find_unused_parameters=False) needs every parameter to be used."""
    assert _clip_grads(make(tiny())) == []


def test_vision_weights_from_a_trunk_state_dict(tmp_path: Path) -> None:
    src = make(tiny(), seed=0)
    torch.save(src.vision.trunk.state_dict(), tmp_path / "vit.pt")
    dst = make(tiny(vision_weights=str(tmp_path / "vit.pt")), seed=1)
    fresh = make(tiny(), seed=1)
    pixels = batch()[schema.PIXELS]
    with torch.no_grad():
        want = src.vision(pixels)[0]
        torch.testing.assert_close(dst.vision(pixels)[0], want)
        assert not torch.allclose(fresh.vision(pixels)[0], want)    # the seed alone differs


def test_vision_weights_are_never_silently_ignored(tmp_path: Path) -> None:
    """BUG: VisionTower loads with strict=False, so a state dict whose keys do not match (here
    the VisionTower's own, keys 'trunk.*'; or a vlmray checkpoint's 'model' dict) loads
    nothing and the run trains from random init without a word. It should load or raise."""
    src = make(tiny(), seed=0)
    torch.save(src.vision.state_dict(), tmp_path / "tower.pt")
    pixels = batch()[schema.PIXELS]
    try:
        dst = make(tiny(vision_weights=str(tmp_path / "tower.pt")), seed=1)
    except (RuntimeError, ValueError, KeyError):
        return                                                      # a loud failure is fine
    with torch.no_grad():
        same = torch.allclose(dst.vision(pixels)[0], src.vision(pixels)[0])
    assert same, "vision_weights matched no parameter and was silently ignored"


@pytest.fixture
def saved_bert(tmp_path: Path) -> tuple[Path, object]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=V, max_position_embeddings=64, **{
        k: v for k, v in TINY_BERT.items() if k != "model_type"})
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", bert


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE, and any network connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("network access while building the model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_text_weights_from_a_local_dir(saved_bert: tuple[Path, object], offline: None) -> None:
    path, bert = saved_bert
    model = make(tiny(text_weights=str(path), text={"model_type": "not_used"}), seed=9)
    assert model.text.width == 32
    loaded = model.text.encoder.state_dict()
    for name, value in bert.state_dict().items():
        assert torch.equal(loaded[name], value), name
    b = batch()
    with torch.no_grad():
        want = bert(input_ids=b[schema.TOKENS],
                    attention_mask=b[schema.TOKEN_MASK]).last_hidden_state
        torch.testing.assert_close(model.text(b[schema.TOKENS], b[schema.TOKEN_MASK]), want)


def test_text_weights_tower_has_no_unused_parameters(saved_bert: tuple[Path, object],
                                                     offline: None) -> None:
    """BUG: TextTower(weights=...) calls AutoModel.from_pretrained without
    add_pooling_layer=False, so BERT gets a freshly initialised pooler that no loss uses; under
    DDP (Ray's prepare_model, find_unused_parameters=False) the first backward fails."""
    path, _ = saved_bert
    model = make(tiny(text_weights=str(path)), seed=9)
    assert _clip_grads(model) == []
