"""CLIPPO: one tower for images and rendered text; rendering; evaluation; the config check.

    pytest tests/models/test_clippo.py -q
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmray.config import ConfigError, ModelConfig
from vlmray.config.data import SyntheticConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.data.decode import DecodeSpec
from vlmray.data.render import BACKGROUND_BRIGHTNESS, render_text, render_texts
from vlmray.data.synthetic import write_synthetic
from vlmray.data.tokenize import HashTokenizer
from vlmray.distributed import Dist
from vlmray.eval import HeldOut, evaluate, load_heldout
from vlmray.eval.evaluate import reads_rendered_text
from vlmray.eval.heldout import class_prompts
from vlmray.eval.metrics import class_embeddings
from vlmray.models import MODEL_ARCHS, build_model
from vlmray.models.clippo import Clippo
from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, MLM_STATES
from vlmray.objectives import ObjectiveMix
from vlmray.recipes import recipe
from vlmray.validate import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S, B, D = 32, 6, 16
CAPTIONS = ["a photo of 3 red circles", "two small blue squares", "a big green triangle",
            "picture of a yellow cross", "one purple circle at the top", "4 tiny red squares"]


def tiny_clippo(**kw: object) -> Clippo:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="clippo", embed_dim=D, vision_kwargs={
        "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}, **kw)
    return build_model(cfg, image_size=S, vocab_size=64, context_length=8)


def clippo_batch(n: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {schema.PIXELS: torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
            schema.TEXT_PIXELS: torch.from_numpy(render_texts(CAPTIONS[:n], S))}


def test_registered_and_forward_shapes() -> None:
    assert "clippo" in MODEL_ARCHS.names()
    model = tiny_clippo()
    assert isinstance(model, Clippo) and reads_rendered_text(model)
    assert not reads_rendered_text(build_model(ModelConfig(), image_size=S, vocab_size=64,
                                               context_length=8))
    out = model(clippo_batch(), {"image_tokens", "text_tokens"})
    assert out.image_embeds.shape == out.text_embeds.shape == (B, D)
    for emb in (out.image_embeds, out.text_embeds):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
    n_patches = (S // 8) ** 2 + 1                                      # + the CLS token
    assert out.image_tokens.shape == out.text_tokens.shape == (B, n_patches, D)
    assert out.text_mask.shape == (B, n_patches) and bool(out.text_mask.all())
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias is None
    assert tiny_clippo(init_logit_bias=-10.0)(clippo_batch(), ()).logit_bias.item() == -10.0


def test_text_and_image_share_every_parameter() -> None:
    """One tower and one head: the text path is the image path applied to rendered pixels, and
    each path alone sends a gradient to every tower and head parameter."""
    model = tiny_clippo()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("text", "image_proj", "text_proj")) for n in names), names
    batch = clippo_batch()
    torch.testing.assert_close(model.encode_text(batch[schema.TEXT_PIXELS])[0],
                               model.encode_image(batch[schema.TEXT_PIXELS])[0])
    shared = {n for n in names if n.startswith(("tower.", "proj."))}
    assert shared and shared | {"log_logit_scale"} == set(names)
    for side in ("image_embeds", "text_embeds"):
        model.zero_grad(set_to_none=True)
        out = model(batch, ())
        probe = torch.randn(B, D, generator=torch.Generator().manual_seed(3))
        (getattr(out, side) * probe).sum().backward()
        got = {n for n, p in model.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == shared, (side, shared - got)


def test_clip_objective_trains_it_unchanged() -> None:
    """The clip loss on CLIPPO's outputs: finite, near log(B) at init, gradients reach the
    shared tower from both sides (the sum of the two one-sided gradients), and one Adam step
    lowers it on a fixed batch."""
    model = tiny_clippo()
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip")])
    batch = clippo_batch()
    loss = mix(batch, model(batch, mix.needs), Dist()).loss
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(B), rel=0.3)
    loss.backward()
    patch_grad = model.tower.trunk.patch_embed.proj.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        step_loss = mix(batch, model(batch, mix.needs), Dist()).loss
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_clear_errors() -> None:
    model = tiny_clippo()
    batch = clippo_batch()
    with pytest.raises(ValueError, match="render_text"):
        model({schema.PIXELS: batch[schema.PIXELS]}, ())
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.zeros(B, 8, dtype=torch.long), torch.ones(B, 8))
    with pytest.raises(ValueError, match="mlm_states"):
        model(batch, {MLM_STATES})
    views = torch.stack([batch[schema.PIXELS]] * 2, dim=1)             # (B, 2, 3, S, S)
    out = model({**batch, schema.PIXELS_VIEWS: views}, {IMAGE_VIEW_EMBEDS})
    assert out.extra[IMAGE_VIEW_EMBEDS].shape == (B, 2, D)
    torch.testing.assert_close(out.extra[IMAGE_VIEW_EMBEDS][:, 1], out.image_embeds)
    with pytest.raises(ConfigError, match="ra_layers"):
        build_model(ModelConfig(arch="clippo", ra_layers=1, ra_ref_dim=8), image_size=S,
                    vocab_size=64, context_length=8)


def test_render_is_deterministic_and_distinguishes_texts() -> None:
    a = render_text("a photo of 3 red circles", 64)
    assert a.shape == (3, 64, 64) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, render_text("a photo of 3 red circles", 64))
    np.testing.assert_array_equal(a[0], a[2])                          # grey, 3 channels
    assert (a != BACKGROUND_BRIGHTNESS).any()                          # something was drawn
    assert (a != render_text("a photo of 3 blue circles", 64)).any()
    assert (a != render_text("a photo of 3 red squares", 64)).any()
    np.testing.assert_array_equal(render_text("A Photo", 32), render_text("a photo", 32))
    assert (render_text("", 32) == BACKGROUND_BRIGHTNESS).all()
    many = render_texts(CAPTIONS, 48)
    assert many.shape == (len(CAPTIONS), 3, 48, 48)
    np.testing.assert_array_equal(many[2], render_text(CAPTIONS[2], 48))
    assert len({m.tobytes() for m in many}) == len(CAPTIONS)           # all distinct
    long = " ".join(["word"] * 200)                                    # overflows: clipped
    assert render_text(long, 32).shape == (3, 32, 32)


def tiny_heldout(n: int = 12) -> HeldOut:
    g = torch.Generator().manual_seed(5)
    classnames, templates = ["red circle", "blue square", "green triangle"], ["a {}.", "{}"]
    labels = torch.arange(n) % len(classnames)
    return HeldOut(pixels=torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
                   tokens=torch.zeros(n, 8, dtype=torch.long),
                   token_mask=torch.ones(n, 8, dtype=torch.long), labels=labels,
                   classnames=classnames, templates=templates,
                   texts=[f"a photo of {classnames[y]} number {i}" for i, y in
                          enumerate(labels.tolist())])


def test_evaluate_renders_text_for_clippo() -> None:
    model, data, tok = tiny_clippo(), tiny_heldout(), HashTokenizer(vocab_size=64,
                                                                  context_length=8)
    model.train()
    small = evaluate(model, data, tok, batch_size=5)                   # several batches
    assert model.training
    assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1 for v in small.values())
    assert small["zero_shot_chance"] == pytest.approx(1 / 3)
    assert evaluate(model, data, tok, batch_size=100) == pytest.approx(small)
    assert data.rendered_captions(S).shape == (12, 3, S, S)
    assert data.rendered_prompts(S).shape == (3 * 2, 3, S, S)

    model.eval()                                                       # a plain recomputation
    with torch.no_grad():
        img = model.encode_image(data.pixels)[0]
        txt = model.encode_text(torch.from_numpy(render_texts(data.texts, S)))[0]
        prompts = render_texts(class_prompts(data.classnames, data.templates), S)
        classes = class_embeddings(model.encode_text(torch.from_numpy(prompts))[0], 3)
    top1 = ((img @ classes.T).argmax(1) == data.labels).float().mean().item()
    assert small["zero_shot_top1"] == pytest.approx(top1)
    i2t = ((img @ txt.T).argmax(1) == torch.arange(12)).float().mean().item()
    assert small["retrieval_i2t_r1"] == pytest.approx(i2t)
    with pytest.raises(ValueError, match="texts"):
        evaluate(model, dataclasses.replace(data, texts=[]), tok)


def test_config_requires_rendered_text() -> None:
    cfg = validate(recipe("clippo_tiny"))
    assert cfg.model.arch == "clippo" and cfg.data.views.render_text
    assert cfg.objectives[0].name == "clip" and cfg.data.image_size >= 64
    with pytest.raises(ConfigError, match="render_text"):
        validate(recipe("clippo_tiny", **{"data.views.render_text": "false"}))
    model = build_model(cfg.model, image_size=cfg.data.image_size, vocab_size=64,
                        context_length=8)
    batch = {schema.PIXELS: torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
             schema.TEXT_PIXELS: torch.from_numpy(render_texts(CAPTIONS[:2], 64))}
    out = model(batch, ())
    assert out.image_embeds.shape == out.text_embeds.shape == (2, cfg.model.embed_dim)
    assert F.cosine_similarity(out.text_embeds[0], out.text_embeds[1], dim=0) < 1 - 1e-6


def test_load_heldout_keeps_caption_strings(tmp_path: Path) -> None:
    write_synthetic(SyntheticConfig(num_train=4, num_eval=8, image_size=32, shard_size=8),
                    str(tmp_path))
    tok = HashTokenizer(vocab_size=64, context_length=8)
    data = load_heldout(str(tmp_path / "eval"), DecodeSpec(image_size=S), tok, max_samples=100)
    assert len(data.texts) == len(data) == 8 and all(data.texts)
    ids, _ = tok(data.texts)
    np.testing.assert_array_equal(ids, data.tokens.numpy())            # the same captions
    assert data.rendered_captions(S).shape == (8, 3, S, S)
