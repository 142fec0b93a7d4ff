"""SegCLIP's grouped ViT: the semantic group module against a float64 reference written from the
equations, straight-through assignment, the arch's settings, gradients reaching every parameter,
and open-vocabulary segmentation on the built-in data's masks.

    pytest tests/models/test_segclip.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.config import ConfigError, DataConfig, ModelConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.synthetic import CLASSNAMES, OBJECTS, TEMPLATES, label_map, make_sample
from vlmray.eval.heldout import HeldOut
from vlmray.models import MODEL_ARCHS, build_model, validate_model_config
from vlmray.models.segclip import BACKGROUND_PROMPT, SegClip, SemanticGroup

B, S, P, V, L, D, K, C = 4, 32, 8, 512, 16, 16, 5, 32
TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64}
VIT = {"patch_size": P, "embed_dim": C, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**arch: object) -> ModelConfig:
    return ModelConfig(arch="segclip", arch_kwargs={"centres": K, "heads": 2, **arch},
                       vision_kwargs=dict(VIT), text=dict(TEXT), embed_dim=D)


def make(seed: int = 0, **arch: object) -> SegClip:
    torch.manual_seed(seed)
    return build_model(config(**arch), image_size=S, vocab_size=V, context_length=L).eval()


# --- the group module against the equations --------------------------------------------------

def _ln(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _lin(x: Tensor, layer: torch.nn.Linear) -> Tensor:
    return x @ layer.weight.T + layer.bias


def _reference(g: SemanticGroup, patches: Tensor, context: Tensor, heads: int,
               hard: bool) -> tuple[Tensor, Tensor]:
    """One image at a time: (Z (B, K, C), A (B, N, K)) from the module docstring's equations."""
    zs, assigns = [], []
    width = g.centres.shape[1]
    wq, wk, wv = g.attn.in_proj_weight.chunk(3)
    bq, bk, bv = g.attn.in_proj_bias.chunk(3)
    d = width // heads
    for x, ctx in zip(patches, context):
        cen, kv = _ln(g.centres, g.norm_centres), _ln(ctx, g.norm_context)
        q, k, v = cen @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv
        att = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
            att.append(w @ v[:, sl])
        queries = g.centres + torch.cat(att, -1) @ g.attn.out_proj.weight.T + g.attn.out_proj.bias
        s = (_lin(_ln(x, g.norm_patches), g.to_q) @ _lin(_ln(queries, g.norm_query), g.to_k).T
             / (math.sqrt(width) * g.tau))                                  # (N, K)
        a = torch.softmax(s, -1)
        if hard:
            a = F.one_hot(a.argmax(-1), a.shape[1]).double()
        z = queries + _lin(a.T @ x / (a.sum(0)[:, None] + 1.0), g.out)     # (K, C)
        hidden = F.gelu(_lin(_ln(z, g.norm_mlp), g.mlp[0]))
        zs.append(z + _lin(hidden, g.mlp[2]))
        assigns.append(a)
    return torch.stack(zs), torch.stack(assigns)


@pytest.mark.parametrize("hard", [False, True])
def test_group_module_matches_reference(hard: bool) -> None:
    torch.manual_seed(0)
    g = SemanticGroup(C, centres=K, heads=4, tau=0.5, hard=hard).double().eval()
    with torch.no_grad():                       # non-trivial norms and biases
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    patches = torch.randn(3, 16, C, dtype=torch.float64)
    context = torch.cat([torch.randn(3, 1, C, dtype=torch.float64), patches], 1)
    tokens, assign = g(patches, context)
    ref_tokens, ref_assign = _reference(g, patches, context, heads=4, hard=hard)
    torch.testing.assert_close(assign, ref_assign, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-10, atol=1e-10)
    if hard:
        assert set(assign.unique().tolist()) == {0.0, 1.0} and (assign.sum(-1) == 1).all()


def test_hard_assignment_has_the_soft_gradient() -> None:
    """Straight-through: one-hot forward, the softmax's gradient backward."""
    torch.manual_seed(0)
    soft = SemanticGroup(C, centres=K, heads=2, hard=False).double()
    hard = SemanticGroup(C, centres=K, heads=2, hard=True).double()
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(2, 16, C, dtype=torch.float64)
    queries = torch.randn(2, K, C, dtype=torch.float64)
    weight = torch.randn(2, 16, K, dtype=torch.float64)
    grads = []
    for g in (soft, hard):
        xi = x.clone().requires_grad_(True)
        a = g.assignment(xi, queries)
        (a * weight).sum().backward()
        grads.append(xi.grad)
    a_soft, a_hard = soft.assignment(x, queries), hard.assignment(x, queries)
    assert torch.equal(a_hard, F.one_hot(a_soft.argmax(-1), K).double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert grads[0].abs().sum() > 0


def test_gumbel_noise_only_in_training() -> None:
    torch.manual_seed(0)
    g = SemanticGroup(C, centres=K, heads=2, hard=False, gumbel=True)
    x, q = torch.randn(2, 16, C), torch.randn(2, K, C)
    plain = SemanticGroup(C, centres=K, heads=2, hard=False)
    plain.load_state_dict(g.state_dict())
    g.eval()
    torch.testing.assert_close(g.assignment(x, q), plain.assignment(x, q))
    g.train()
    assert not torch.allclose(g.assignment(x, q), g.assignment(x, q))


# --- the arch --------------------------------------------------------------------------------

def pixels(n: int = B, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)


def test_registered_and_split_from_config() -> None:
    assert "segclip" in MODEL_ARCHS.names()
    model = make()
    assert isinstance(model, SegClip) and model.split == 2          # -1: before the last block
    assert model.group.centres.shape == (K, C)
    assert make(split=0).split == 0 and make(split=3).split == 3


@pytest.mark.parametrize("arch, match", [
    ({"centers": 8}, "unknown"), ({"split": 4}, "outside"), ({"split": -4}, "outside"),
    ({"heads": 3}, "divide"), ({"tau": 0.0}, "tau"), ({"hard": "yes"}, "hard"),
    ({"centres": 0}, "centres"), ({"centres": 2.5}, "int"),
])
def test_bad_arch_kwargs_are_rejected(arch: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_model_config(config(**arch))


def test_encode_image_pools_the_centres() -> None:
    model = make()
    emb, tokens = model.encode_image(pixels(), tokens=True)
    assert emb.shape == (B, D) and tokens.shape == (B, K, D)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
    # image_proj has no bias: the embedding is the normalised mean of the centre tokens
    torch.testing.assert_close(emb, F.normalize(tokens.mean(1), dim=-1))
    assert model.encode_image(pixels())[1] is None
    assign, centres = model.segment(pixels())
    assert assign.shape == (B, (S // P) ** 2, K) and centres.shape == (B, K, D)
    torch.testing.assert_close(centres, F.normalize(tokens, dim=-1))
    with pytest.raises(ValueError, match="refs"):
        model.encode_image(pixels(), refs=(tokens, tokens, tokens))


@pytest.mark.parametrize("split", [0, -1, 3])
def test_clip_loss_reaches_every_parameter(split: int) -> None:
    """DDP needs a gradient on every parameter (straight-through reaches W_q and W_k)."""
    model = make(split=split).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, L), generator=g)
    batch = {schema.PIXELS: pixels(), schema.TOKENS: ids, schema.TOKEN_MASK: torch.ones_like(ids)}
    out = model(batch, {"image_tokens"})
    assert out.image_tokens.shape == (B, K, D)
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.T
    target = torch.arange(B)
    (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.group.to_q.weight.grad.abs().sum() > 0


# --- open-vocabulary segmentation ------------------------------------------------------------

def heldout(n: int = 6) -> tuple[HeldOut, object]:
    data_cfg = DataConfig(image_size=S, context_length=L, vocab_size=V)
    tok = tokenizer_for(data_cfg)
    syn = SyntheticConfig(num_train=n, num_eval=n, image_size=48)
    samples = [make_sample(syn, "eval", i) for i in range(n)]
    rows = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                        [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                        decode_spec(data_cfg), tok)
    data = HeldOut(pixels=torch.from_numpy(rows[schema.PIXELS]),
                   tokens=torch.from_numpy(rows[schema.TOKENS]),
                   token_mask=torch.from_numpy(rows[schema.TOKEN_MASK]),
                   labels=torch.from_numpy(rows[schema.LABEL]), classnames=list(CLASSNAMES),
                   templates=list(TEMPLATES), metas=[s[schema.META] for s in samples])
    return data, tok


def _reference_maps(model: SegClip, data: HeldOut, tok: object, rows: list[int]) -> np.ndarray:
    """Plain loops: class table, each pixel's patch -> centre -> class; (len(rows), S, S)."""
    def text(prompts: list[str]) -> Tensor:
        ids, mask = tok(prompts)
        return model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))[0].double()

    with torch.no_grad():
        table = [text([BACKGROUND_PROMPT])[0]]
        for name in data.classnames:
            table.append(F.normalize(text([t.format(name) for t in data.templates]).mean(0),
                                     dim=0))
        table = torch.stack(table)                                          # (C + 1, D)
        assign, centres = model.segment(data.pixels[rows])
    preds = []
    for a, e in zip(assign, centres):
        centre_class = (e.double() @ table.T).argmax(-1)
        pred = np.zeros((S, S), dtype=np.int64)
        for y in range(S):
            for x in range(S):
                pred[y, x] = centre_class[a[(y // P) * (S // P) + x // P].argmax()]
        preds.append(pred)
    return np.stack(preds)


def _reference_scores(model: SegClip, data: HeldOut, tok: object,
                      rows: list[int]) -> dict[str, float]:
    """The scores of ``_reference_maps``, IoU from pixel sets over all the rows together."""
    pred = _reference_maps(model, data, tok, rows)
    truth = np.stack([label_map(json.loads(data.metas[i]), S) for i in rows])
    ious = {c: ((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum()
            for c in set(pred.ravel()) | set(truth.ravel())}
    background = ((truth == 0).sum() / truth.size) / len(set(truth.ravel()))
    return {"seg_miou": float(np.mean(list(ious.values()))),
            "seg_miou_fg": float(np.mean([v for c, v in ious.items() if c]) if len(ious) > 1
                                 else 0.0),
            "seg_pixel_acc": float((pred == truth).mean()),
            "seg_miou_all_background": float(background)}


def test_segmentation_eval_matches_plain_reference() -> None:
    model = make(seed=3, hard=False)      # soft: centres differ, several classes appear
    data, tok = heldout()
    # An untrained model rarely names the true class: relabel each image's objects with the
    # foreground class the model predicts most there, so the scores are not all zero.
    metas = []
    for meta, pred in zip(data.metas, _reference_maps(model, data, tok, list(range(len(data))))):
        m, fg = json.loads(meta), pred[pred > 0]
        m["label"] = int(np.bincount(fg).argmax()) - 1 if fg.size else m["label"]
        metas.append(json.dumps(m))
    data.metas = metas
    scores = model.evaluate_heldout(data, tok)
    ref = _reference_scores(model, data, tok, list(range(len(data))))
    if "seg_miou_fg" not in scores:       # only when neither map has a foreground class
        ref.pop("seg_miou_fg")
    assert scores == pytest.approx(ref, abs=1e-9)
    assert 0.0 < scores["seg_miou_fg"] and 0.0 < scores["seg_miou"] < 1.0
    assert 0.0 < scores["seg_pixel_acc"] < 1.0 and scores["seg_miou_all_background"] > 0


def test_segmentation_skips_rows_without_objects() -> None:
    model = make(seed=3, hard=False)
    data, tok = heldout()
    stripped = []
    for i, meta in enumerate(data.metas):
        m = json.loads(meta)
        if i % 2:
            del m[OBJECTS]
        stripped.append(json.dumps(m))
    data.metas = stripped
    scores = model.evaluate_heldout(data, tok)
    ref = _reference_scores(model, data, tok, [0, 2, 4])
    assert scores["seg_miou"] == pytest.approx(ref["seg_miou"], abs=1e-9)
    assert scores["seg_miou_all_background"] == pytest.approx(ref["seg_miou_all_background"])
    data.metas = [json.dumps({k: v for k, v in json.loads(m).items() if k != OBJECTS})
                  for m in stripped]
    assert model.evaluate_heldout(data, tok) == {}
