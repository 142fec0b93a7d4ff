"""``multicrop_clip`` (KELIP's multi-crop CLIP): loss and gradients against a float64 reference
written from the equation (every image set against the captions, averaged), its relation to
``clip``, config errors, and 1 process vs 2 gloo processes (loss and averaged gradients).

    pytest tests/objectives/test_multicrop_clip.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, Outputs
from vlmray.objectives import build_objective, list_objectives

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, W, V, D, F_IN = 8, 2, 3, 6, 5


def objective(**params: Any) -> nn.Module:
    return build_objective(ObjectiveSpec(name="multicrop_clip", params=params))


def embeddings(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """image (n, D), views (n, V, D), text (n, D) normalised float64 leaves; scale ()."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    views = F.normalize(image[:, None] + 0.5 * torch.randn(n, V, D, generator=g,
                                                           dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(4.0, dtype=torch.float64)
    return tuple(t.detach().requires_grad_() for t in (image, views, text, scale))


def reference(image: Tensor, views: Tensor, text: Tensor, scale: Tensor,
              include_image: bool = True) -> Tensor:
    """1/K sum_k 1/(2N) sum_i [-log softmax_j(s u^k_i.v_j)_i - log softmax_j(s v_i.u^k_j)_i],
    written with explicit sums over rows."""
    sets = ([image] if include_image else []) + [views[:, k] for k in range(views.shape[1])]
    total = torch.zeros((), dtype=torch.float64)
    n = text.shape[0]
    for u in sets:
        for i in range(n):
            i2t = torch.stack([scale * (u[i] * text[j]).sum() for j in range(n)])
            t2i = torch.stack([scale * (text[i] * u[j]).sum() for j in range(n)])
            total = total + (torch.logsumexp(i2t, 0) - i2t[i] + torch.logsumexp(t2i, 0)
                             - t2i[i]) / (2 * n)
    return total / len(sets)


@pytest.mark.parametrize("params", [{}, {"gather": "global"}, {"include_image": False}])
def test_matches_reference(params: dict[str, Any]) -> None:
    image, views, text, scale = embeddings()
    out = Outputs(image_embeds=image, text_embeds=text, logit_scale=scale,
                  extra={IMAGE_VIEW_EMBEDS: views})
    result = objective(**params)({}, out, Dist())
    want = reference(image, views, text, scale, params.get("include_image", True))
    torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
    wrt = (image, views, text, scale)[0 if params.get("include_image", True) else 1:]
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert {"acc_i2t", "acc_t2i", "logit_scale", "loss_views"} <= set(result.metrics)
    assert ("loss_image" in result.metrics) == params.get("include_image", True)


def test_relation_to_clip_and_errors() -> None:
    assert "multicrop_clip" in list_objectives()
    image, views, text, scale = embeddings()
    clip = build_objective(ObjectiveSpec(name="clip"))
    plain = clip({}, Outputs(image_embeds=image, text_embeds=text, logit_scale=scale), Dist())
    same = Outputs(image_embeds=image, text_embeds=text, logit_scale=scale,   # views = image
                   extra={IMAGE_VIEW_EMBEDS: image[:, None].expand(-1, V, -1)})
    torch.testing.assert_close(objective()({}, same, Dist()).loss, plain.loss)
    mixed = objective()({}, Outputs(image_embeds=image, text_embeds=text, logit_scale=scale,
                                    extra={IMAGE_VIEW_EMBEDS: views}), Dist())
    assert mixed.metrics["loss_image"] == pytest.approx(plain.loss.item())
    assert mixed.loss.item() == pytest.approx((plain.loss.item() + V * mixed.metrics[
        "loss_views"]) / (V + 1))
    with pytest.raises(ValueError, match="image_view_embeds.*data.views.image"):
        objective()({}, Outputs(image_embeds=image, text_embeds=text, logit_scale=scale), Dist())
    with pytest.raises(ValueError, match="label_smoothing"):
        objective(label_smoothing=1.0)
    with pytest.raises(ValueError, match="not a choice"):
        objective(gather="ring")


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


class TinyTowers(nn.Module):
    """Linear encoders of fixed features (float64): image, its V views, text; normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(F_IN, D, dtype=torch.float64)
        self.text = nn.Linear(F_IN, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0), dtype=torch.float64))

    def forward(self, pix: Tensor, view_pix: Tensor, words: Tensor) -> Outputs:
        return Outputs(image_embeds=F.normalize(self.image(pix), dim=-1),
                       text_embeds=F.normalize(self.text(words), dim=-1),
                       logit_scale=self.log_scale.exp(),
                       extra={IMAGE_VIEW_EMBEDS: F.normalize(self.image(view_pix), dim=-1)})


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(N, F_IN, generator=g, dtype=torch.float64),
            torch.randn(N, V, F_IN, generator=g, dtype=torch.float64),
            torch.randn(N, F_IN, generator=g, dtype=torch.float64))


def _loss_and_grads(state: dict, pix: Tensor, view_pix: Tensor, words: Tensor,
                    dist: Dist) -> tuple[float, dict[str, Tensor]]:
    towers = TinyTowers()
    towers.load_state_dict(state)
    loss = objective()({}, towers(pix, view_pix, words), dist).loss
    loss.backward()
    return loss.item(), {k: p.grad for k, p in towers.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, pix: Tensor, view_pix: Tensor,
            words: Tensor) -> tuple[float, dict[str, Tensor]]:
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    loss, grads = _loss_and_grads(state, pix[rows], view_pix[rows], words[rows], dist)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads


def test_two_processes_match_one() -> None:
    torch.manual_seed(0)
    setup = (TinyTowers().state_dict(), *_inputs())
    results = run_gloo(_worker, W, *setup)
    loss, grads = _loss_and_grads(*setup, Dist())
    for dist_loss, dist_grads in results:
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        assert dist_grads.keys() == grads.keys() and len(grads) == 5
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)
