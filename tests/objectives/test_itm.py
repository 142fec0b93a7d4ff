"""ItmLoss and FusionEncoder: shapes, the negative sampler (never the positive, follows the
softmax), the loss against a per-pair float64 reference (loss + grads), 1 process vs 2 gloo
processes (same negatives, loss and averaged grads), and a tiny training loop that learns ITM.

    pytest tests/objectives/test_itm.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.alignment.itm  # noqa: F401  (registers "itm")
from tests.distributed._spawn import run_gloo
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.fusion import FusionEncoder
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives
from vlmray.objectives.alignment.itm import ItmLoss, negative_weights
from vlmray.objectives.base import SetupContext

N, W, D, NI, L = 8, 2, 8, 3, 5


class TinyTokens(nn.Module):
    """Linear token encoders (float64); embeddings are the normalised token means."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, D, dtype=torch.float64)
        self.text = nn.Linear(6, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor, mask: Tensor) -> Outputs:
        img_tok, txt_tok = self.image(pixels), self.text(tokens)
        return Outputs(image_embeds=F.normalize(img_tok.mean(1), dim=-1),
                       text_embeds=F.normalize(txt_tok.mean(1), dim=-1),
                       image_tokens=img_tok, text_tokens=txt_tok, text_mask=mask,
                       logit_scale=self.log_scale.exp())


def _objective(dim: int = D, **params: Any) -> ItmLoss:
    torch.manual_seed(1)
    obj = build_objective(ObjectiveSpec(name="itm", params={"layers": 1, "heads": 2, **params}))
    obj.setup(SetupContext(model=nn.Identity(), embed_dim=dim, text_width=0, vocab_size=0))
    return obj.double()


def _inputs(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """pixels (n, NI, 5), tokens (n, L, 6), mask (n, L) with lengths 1..L (first always real)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, NI, 5, generator=g, dtype=torch.float64)
    tokens = torch.randn(n, L, 6, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    return pixels, tokens, torch.arange(L) < lengths[:, None]


def test_fusion_shapes_and_padding() -> None:
    torch.manual_seed(0)
    fusion = FusionEncoder(D, layers=2, heads=2).double()
    g = torch.Generator().manual_seed(0)
    text = torch.randn(3, L, D, generator=g, dtype=torch.float64)
    image = torch.randn(3, NI, D, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    states = fusion(text, image, mask)
    assert states.shape == (3, L, D) and fusion.pooled(text, image, mask).shape == (3, D)
    noisy = text.masked_fill(~mask[..., None], 7.0)  # padded positions must not matter
    torch.testing.assert_close(fusion(noisy, image, mask)[mask], states[mask])
    with pytest.raises(ValueError, match="not divisible"):
        FusionEncoder(D, layers=1, heads=3)


def test_forward_shapes_metrics_and_registry() -> None:
    assert "itm" in list_objectives()
    assert ItmLoss.needs >= {"image_embeds", "text_embeds", "logit_scale", "image_tokens",
                             "text_tokens", "text_mask"}
    obj = _objective(hard_negatives=False, seed=3)
    assert obj.cfg.hard_negatives is False and obj.cfg.seed == 3
    result = obj({}, TinyTokens()(*_inputs()), Dist())
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
    assert set(result.metrics) == {"acc", "acc_pos", "acc_neg"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    neg_text, neg_image = obj.last_negatives
    assert neg_text.shape == neg_image.shape == (N,) and int(obj.step) == 1
    assert "step" in obj.state_dict()
    with pytest.raises(ValueError, match="call setup"):
        ItmLoss()({}, TinyTokens()(*_inputs()), Dist())


@pytest.mark.parametrize("hard", [True, False])
def test_negatives_never_positive_and_follow_weights(hard: bool) -> None:
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    obj, draws = _objective(hard_negatives=hard), 2000
    counts_t, counts_i = torch.zeros(4, 4), torch.zeros(4, 4)
    for step in range(draws):
        neg_text, neg_image = obj.sample(image, text, scale, step)
        counts_t[torch.arange(4), neg_text] += 1
        counts_i[torch.arange(4), neg_image] += 1
    logits = scale * image @ text.T
    for counts, want in ((counts_t, negative_weights(logits, hard)),
                         (counts_i, negative_weights(logits.T, hard))):
        assert counts.diagonal().sum() == 0
        torch.testing.assert_close(counts.double() / draws, want, atol=0.05, rtol=0)
    if hard:  # a weight row really is softmax over the off-diagonal columns
        row = torch.cat((logits[0, :0], logits[0, 1:])).softmax(0)
        torch.testing.assert_close(negative_weights(logits, True)[0, 1:], row)
    # reproducible: same seed and step -> same draw; the step counter changes it
    same = [torch.stack(_objective().sample(image, text, scale, 7)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1])


def reference_itm_loss(obj: ItmLoss, img_tok: Tensor, txt_tok: Tensor, mask: Tensor,
                       neg_text: Tensor, neg_image: Tensor) -> Tensor:
    """Mean CE over the 3B pairs, one pair at a time, padded text tokens cut off (no mask)."""
    def score(t: int, i: int, label: int) -> Tensor:
        text = txt_tok[t, : int(mask[t].sum())][None]
        logits = obj.head(obj.fusion.pooled(text, img_tok[i][None]))[0]
        return -logits.log_softmax(0)[label]

    b = img_tok.shape[0]
    terms = [score(i, i, 1) + score(int(neg_text[i]), i, 0) + score(i, int(neg_image[i]), 0)
             for i in range(b)]
    return torch.stack(terms).sum() / (3 * b)


def test_loss_matches_reference() -> None:
    out = TinyTokens()(*_inputs(seed=2))
    img_tok = out.image_tokens.detach().requires_grad_()
    txt_tok = out.text_tokens.detach().requires_grad_()
    out.image_tokens, out.text_tokens = img_tok, txt_tok
    obj = _objective()
    got = obj({}, out, Dist()).loss
    want = reference_itm_loss(obj, img_tok, txt_tok, out.text_mask, *obj.last_negatives)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    wrt = (img_tok, txt_tok, *obj.parameters())
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


def _setup() -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    return (TinyTokens().state_dict(), _objective().state_dict(), *_inputs(seed=4))


def _loss_and_grads(state: dict, obj_state: dict, pixels: Tensor, tokens: Tensor, mask: Tensor,
                    dist: Dist) -> tuple[float, dict[str, Tensor], Tensor]:
    model, obj = TinyTokens(), _objective()
    model.load_state_dict(state)
    obj.load_state_dict(obj_state)
    loss = obj({}, model(pixels, tokens, mask), dist).loss
    loss.backward()
    params = [(f"model.{k}", p) for k, p in model.named_parameters()]
    params += [(f"itm.{k}", p) for k, p in obj.named_parameters()]
    grads = {k: p.grad for k, p in params if p.grad is not None}  # s only samples: no grad
    return loss.item(), grads, torch.stack(obj.last_negatives)


def _worker(rank: int, world_size: int, state: dict, obj_state: dict, pixels: Tensor,
            tokens: Tensor, mask: Tensor) -> tuple[float, dict[str, Tensor], Tensor]:
    """Each rank: its N/W rows, its loss, backward; then the DDP-style average of loss and grads."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    loss, grads, negatives = _loss_and_grads(state, obj_state, pixels[rows], tokens[rows],
                                             mask[rows], dist)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads, negatives


def test_two_processes_match_one() -> None:
    setup = _setup()
    results = run_gloo(_worker, W, *setup)
    loss, grads, negatives = _loss_and_grads(*setup, Dist())
    torch.testing.assert_close(torch.cat([r[2] for r in results], dim=1), negatives, rtol=0,
                               atol=0)
    for dist_loss, dist_grads, _ in results:
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        assert dist_grads.keys() == grads.keys() and "model.log_scale" not in grads
        assert len(grads) == sum(1 for _ in _objective().parameters()) + 4
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)


# --- learning -----------------------------------------------------------------------------------


def test_tiny_training_loop_learns_itm() -> None:
    """Matched pairs share a random signal z_i; the fusion encoder must learn to compare."""
    dim, b = 16, 16
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, 1, dim, generator=g, dtype=torch.float64)
    img_tok = z + 0.3 * torch.randn(b, NI, dim, generator=g, dtype=torch.float64)
    txt_tok = z + 0.3 * torch.randn(b, L, dim, generator=g, dtype=torch.float64)
    out = Outputs(image_embeds=F.normalize(img_tok.mean(1), dim=-1),
                  text_embeds=F.normalize(txt_tok.mean(1), dim=-1),
                  image_tokens=img_tok, text_tokens=txt_tok,
                  text_mask=torch.ones(b, L, dtype=torch.bool),
                  logit_scale=torch.tensor(10.0, dtype=torch.float64))
    obj = _objective(dim=dim)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    accs = []
    for _ in range(60):
        result = obj({}, out, Dist())
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        accs.append(result.metrics["acc"])
    assert sum(accs[:5]) / 5 < 0.8
    assert sum(accs[-5:]) / 5 > 0.8, accs
