"""ITM through FIBER's fusion in the backbone (``fusion="model"``) and ITM's held-out
evaluation: setup errors, the loss against a per-pair float64 reference (loss + grads), the
DDP question (the objective calls the core model's ``fuse`` outside the DDP forward: 2 gloo
processes under real DistributedDataParallel give the single-process gradients, fusion blocks'
cross-attention and gates included), every parameter used, and ``itm_accuracy`` / ``itm_auc``.

    pytest tests/objectives/test_itm_fiber.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from tests.models.test_fiber import CT, CV, TINY_BERT, TINY_VIT, V, fiber_batch, tiny_fiber
from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.data.tokenize import HashTokenizer
from vlmray.distributed import Dist
from vlmray.eval import HeldOut
from vlmray.models import build_model
from vlmray.models.fiber import FIBER_INPUTS, Fiber
from vlmray.objectives import ObjectiveMix, build_objective
from vlmray.objectives.alignment.itm import ItmLoss, mismatched_pairs, roc_auc
from vlmray.objectives.base import SetupContext

N, W = 8, 2


def context(model: nn.Module) -> SetupContext:
    return SetupContext(model=model, embed_dim=16, text_width=model.text.width, vocab_size=V)


def model_itm(model: Fiber, **params: Any) -> ItmLoss:
    torch.manual_seed(1)
    obj = build_objective(ObjectiveSpec(name="itm", params={"fusion": "model", **params}))
    obj.setup(context(model))
    return obj.to(next(model.parameters()).dtype)


def test_config_needs_and_setup_errors() -> None:
    obj = build_objective(ObjectiveSpec(name="itm", params={"fusion": "model"}))
    assert obj.needs == {"image_embeds", "text_embeds", "logit_scale", FIBER_INPUTS}
    assert "image_tokens" in build_objective(ObjectiveSpec(name="itm")).needs
    dual = build_model(ModelConfig(vision_kwargs=dict(TINY_VIT), text=dict(TINY_BERT),
                                   embed_dim=16), image_size=16, vocab_size=V, context_length=6)
    with pytest.raises(ValueError, match=r"fusion in the backbone \(model.arch='fiber'\)"):
        obj.setup(context(dual))
    with pytest.raises(ValueError, match="'own', 'model'"):
        build_objective(ObjectiveSpec(name="itm", params={"fusion": "fused"}))
    with pytest.raises(ValueError, match="eval_samples"):
        ItmLoss.Config(eval_samples=0)
    obj = model_itm(tiny_fiber())
    assert obj.fusion is None and obj.head.in_features == CV + CT
    assert not any(n.startswith("_model") for n, _ in obj.named_parameters())   # not a submodule


def reference_loss(obj: ItmLoss, model: Fiber, image_in: Tensor, text_in: Tensor, mask: Tensor,
                   neg_text: Tensor, neg_image: Tensor) -> Tensor:
    """Mean CE over the 3B pairs, one pair at a time, padded text tokens cut off."""
    def score(t: int, i: int, label: int) -> Tensor:
        n = int(mask[t].sum())
        text = text_in[t, :n][None]
        x, y = model.fuse(image_in[i][None], text, torch.ones(1, n, dtype=torch.bool))
        logits = obj.head(torch.cat((y[0, 0], x[0, 0])))    # [text CLS ; ViT CLS pooling]
        return -logits.log_softmax(0)[label]

    b = image_in.shape[0]
    terms = [score(i, i, 1) + score(int(neg_text[i]), i, 0) + score(i, int(neg_image[i]), 0)
             for i in range(b)]
    return torch.stack(terms).sum() / (3 * b)


def test_model_fusion_loss_matches_reference() -> None:
    model, b = tiny_fiber(), fiber_batch(6, seed=1)
    obj = model_itm(model)
    out = model(b, obj.needs)
    got = obj(b, out, Dist()).loss
    image_in, text_in = out.extra["fiber_image_in"], out.extra["fiber_text_in"]
    want = reference_loss(obj, model, image_in, text_in, b[schema.TOKEN_MASK],
                          *obj.last_negatives)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    wrt = [p for p in (*model.parameters(), *obj.parameters()) if p.requires_grad]
    got_g = torch.autograd.grad(got, wrt, allow_unused=True, retain_graph=True)
    want_g = torch.autograd.grad(want, wrt, allow_unused=True)
    for a, c in zip(got_g, want_g):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)
    alpha_grads = [g for p, g in zip(wrt, got_g) if p is model.text_blocks[0].alpha]
    assert alpha_grads[0].abs() > 0                            # the gate learns through ITM


# --- DDP: fuse called on the core model outside the DDP forward ----------------------------------


SPECS = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="itm", params={"fusion": "model"}),
         ObjectiveSpec(name="mlm")]


def _step(model_state: dict, mix_state: dict, batch: dict[str, Tensor], dist: Dist,
          ddp: bool) -> tuple[float, dict[str, Tensor]]:
    """Two clip + itm(model) + mlm backwards (the second is returned: DDP raises at the next
    forward when a reduction was left unfinished); grads of the model and the objectives."""
    model = tiny_fiber()
    model.load_state_dict(model_state)
    mix = ObjectiveMix.from_specs(SPECS).setup(context(model)).double()
    mix.load_state_dict(mix_state)
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    for _ in range(2):                       # ITM's step counter: new negatives each time
        model.zero_grad(set_to_none=True)
        mix.zero_grad(set_to_none=True)
        result = mix(batch, wrapped(batch, mix.needs), dist)
        result.loss.backward()
    grads = {f"model.{k}": p.grad for k, p in model.named_parameters()}
    grads.update({f"mix.{k}": p.grad for k, p in mix.named_parameters()})
    return result.loss.item(), grads


def _ddp_worker(rank: int, world_size: int, model_state: dict, mix_state: dict,
                batch: dict[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
    """DDP averages the model's grads inside backward; the objectives' heads are averaged as
    the trainer does (``average_objective_grads``)."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    loss, grads = _step(model_state, mix_state, {k: v[rows] for k, v in batch.items()}, dist,
                        ddp=True)
    for name, grad in grads.items():
        if name.startswith("mix.") and grad is not None:
            torch.distributed.all_reduce(grad)
            grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads


def _setup() -> tuple[dict, dict, dict[str, Tensor]]:
    model = tiny_fiber()
    mix = ObjectiveMix.from_specs(SPECS).setup(context(model)).double()
    return model.state_dict(), mix.state_dict(), fiber_batch(N, seed=2)


def test_ddp_two_processes_match_one() -> None:
    setup = _setup()
    results = run_gloo(_ddp_worker, W, *setup, timeout_s=120)
    loss, grads = _step(*setup, Dist(), ddp=False)
    missing = sorted(k for k, g in grads.items() if g is None)
    assert missing == [], missing                              # DDP needs every one used
    fusion = [k for k in grads if "cross_attn" in k or k.endswith("alpha")]
    assert len(fusion) == 2 * 2 * 7          # streams x blocks x (q, k, v, bias, out x 2, alpha)
    assert all(grads[k].abs().max() > 0 for k in fusion)
    for dist_loss, dist_grads in results:
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        assert dist_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=1e-8, msg=name)


def test_clip_alone_leaves_the_cross_attention_unused() -> None:
    """Why the docs ask for a fused objective: with ITC alone, DDP would see unused params."""
    model, b = tiny_fiber(), fiber_batch(4)
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip")]).double()
    mix(b, model(b, mix.needs), Dist()).loss.backward()
    unused = {k for k, p in model.named_parameters() if p.grad is None}
    assert unused and all("cross_attn" in k or "alpha" in k or "norm_other" in k
                          or "norm_cross" in k for k in unused)


# --- held-out evaluation ------------------------------------------------------------------------


def test_mismatched_pairs_and_auc() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    rows, partners = mismatched_pairs(labels, 6, seed=3)
    assert len(rows) == 6 and len(set(rows.tolist())) == 6
    assert (labels[rows] != labels[partners]).all()
    again = mismatched_pairs(labels, 6, seed=3)
    assert torch.equal(again[0], rows) and torch.equal(again[1], partners)
    all_rows, _ = mismatched_pairs(labels, 100, seed=0)
    assert len(all_rows) == 10
    assert len(mismatched_pairs(torch.zeros(4, dtype=torch.long), 4, 0)[0]) == 0
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(7, generator=g), torch.rand(5, generator=g)
    neg[0] = pos[0]                                            # a tie counts one half
    want = sum((1.0 if p > q else 0.5 if p == q else 0.0) for p in pos for q in neg) / 35
    assert roc_auc(pos, neg) == pytest.approx(want)
    assert roc_auc(torch.ones(3), torch.zeros(2)) == 1.0
    assert roc_auc(torch.zeros(3), torch.ones(2)) == 0.0


def _heldout(n: int = 12) -> HeldOut:
    b = fiber_batch(n, seed=4, double=False)
    return HeldOut(pixels=b[schema.PIXELS], tokens=b[schema.TOKENS],
                   token_mask=b[schema.TOKEN_MASK], labels=torch.arange(n) % 3,
                   classnames=["a", "b", "c"], templates=["{}"])


@pytest.mark.parametrize("fusion", ["own", "model"])
def test_evaluate_matches_per_pair_scores(fusion: str) -> None:
    model = tiny_fiber(double=False).eval()
    torch.manual_seed(1)
    obj = build_objective(ObjectiveSpec(name="itm", params={
        "fusion": fusion, "eval_samples": 8, "layers": 1, "heads": 2}))
    obj.setup(context(model))
    obj.eval()
    data = _heldout()
    metrics = ObjectiveMix({"itm": obj}).evaluate(model, data, HashTokenizer(V, 6))
    rows, partners = mismatched_pairs(data.labels, 8, obj.cfg.seed)

    def p_match(i: int, j: int) -> float:                      # one pair, padding cut off
        n = int(data.token_mask[j].sum())
        ids, mask = data.tokens[j:j + 1, :n], data.token_mask[j:j + 1, :n]
        pixels = data.pixels[i:i + 1]
        with torch.no_grad():
            if fusion == "model":
                x, y = model.fuse(model.image_inputs(pixels), model.text_inputs(ids, mask), mask)
                logits = obj.head(model.pair_features(x, y))
            else:
                img = model.encode_image(pixels, tokens=True)[1]
                logits = obj.head(obj.fusion.pooled(model.encode_text(ids, mask)[1], img))
        return F.softmax(logits, -1)[0, 1].item()

    pos = torch.tensor([p_match(i, i) for i in rows.tolist()])
    neg = torch.tensor([p_match(i, j) for i, j in zip(rows.tolist(), partners.tolist())])
    want_acc = 0.5 * ((pos > 0.5).double().mean() + (neg <= 0.5).double().mean()).item()
    assert set(metrics) == {"itm_accuracy", "itm_auc"}
    assert metrics["itm_accuracy"] == pytest.approx(want_acc)
    assert metrics["itm_auc"] == pytest.approx(roc_auc(pos, neg), abs=1e-6)
    assert 0.0 <= metrics["itm_auc"] <= 1.0
