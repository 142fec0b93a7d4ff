"""FilipLoss: against a loop reference, chunking, top-k, the model's outputs, 1 vs 2 gloo processes.

    pytest tests/objectives/test_filip.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.contrastive.filip as filip_module
from tests.distributed._spawn import run_gloo
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives, validate_spec
from vlmray.objectives.contrastive.filip import FilipLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, W, T_IMG, L, D = 6, 2, 5, 4, 3
LENGTHS = [4, 1, 3, 2, 4, 2]  # unpadded text lengths: every case of padding


def reference_filip(image: Tensor, text: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """The paper's equations as loops; image (N, T, D) already without prefix, no top-k."""
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    n = len(x)
    words = [y[j][mask[j].bool()] for j in range(n)]  # y_j1..y_jn2(j): unpadded only
    s_i = torch.stack([torch.stack([
        torch.stack([max(x[i, k] @ w for w in words[j]) for k in range(x.shape[1])]).mean()
        for j in range(n)]) for i in range(n)])
    s_t = torch.stack([torch.stack([
        torch.stack([max(w @ x[j, k] for k in range(x.shape[1])) for w in words[i]]).mean()
        for j in range(n)]) for i in range(n)])
    labels = torch.arange(n)
    return (F.cross_entropy(scale * s_i, labels) + F.cross_entropy(scale * s_t, labels)) / 2


def inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """image_tokens (N, 1+T, D) with a prefix, text_tokens (N, L, D) with garbage in the pads."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(N, 1 + T_IMG, D, generator=g, dtype=torch.float64)
    text = torch.randn(N, L, D, generator=g, dtype=torch.float64)
    mask = (torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]).long()
    text = torch.where(mask.bool()[..., None], text, 1e3 * text.abs())  # pads would win a max
    return image, text, mask, torch.tensor(4.0, dtype=torch.float64)


def filip(**params: Any) -> FilipLoss:
    return build_objective(ObjectiveSpec(name="filip", params=params))


def loss_and_grads(loss_fn: FilipLoss, image: Tensor, text: Tensor, mask: Tensor,
                   scale: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    out = Outputs(image_tokens=leaves[0], text_tokens=leaves[1], text_mask=mask,
                  logit_scale=leaves[2])
    loss = loss_fn({}, out, Dist()).loss
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("gather", ["local", "global"])
def test_matches_loop_reference_with_padding(gather: str) -> None:
    image, text, mask, scale = inputs()
    loss, grads = loss_and_grads(filip(gather=gather), image, text, mask, scale)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    want = reference_filip(leaves[0][:, 1:], leaves[1], mask, leaves[2])
    torch.testing.assert_close(loss, want.detach())
    for got, ref in zip(grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(got, ref)
    assert grads[0][:, 0].abs().max() == 0                     # the CLS prefix was dropped
    assert grads[1][~mask.bool()].abs().max() == 0             # pads play no part


def test_keep_prefix() -> None:
    image, text, mask, scale = inputs(1)
    loss, _ = loss_and_grads(filip(drop_prefix=False), image, text, mask, scale)
    torch.testing.assert_close(loss, reference_filip(image, text, mask, scale))


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 100])
def test_chunked_equals_unchunked(chunk: int) -> None:
    image, text, mask, scale = inputs(2)
    want_loss, want_grads = loss_and_grads(filip(), image, text, mask, scale)
    loss, grads = loss_and_grads(filip(chunk=chunk), image, text, mask, scale)
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


def test_auto_chunk_follows_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny budget, auto chunking takes one column at a time; same numbers."""
    image, text, mask, scale = inputs(3)
    want_loss, want_grads = loss_and_grads(filip(), image, text, mask, scale)
    seen: list[int] = []
    real = filip_module._chunks
    monkeypatch.setattr(filip_module, "AUTO_CHUNK_ELEMENTS", 2 * N * T_IMG * L - 1)
    monkeypatch.setattr(filip_module, "_chunks",
                        lambda k, m, step: seen.append(step) or real(k, m, step))
    loss, grads = loss_and_grads(filip(), image, text, mask, scale)
    assert seen == [1, 1]                                      # s^I and s^T: 1 column/block
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)


def reference_topk(image: Tensor, text: Tensor, mask: Tensor, k: int, rule: str) -> Tensor:
    """Indices (N, k) of each image's kept tokens, by loops over the rule's definition."""
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    words = [y[j, r] for j in range(len(y)) for r in range(L) if mask[j, r]]
    score = [[max(float(x[i, t] @ w) for w in words) if rule == "similarity"
              else float(image[i, t].norm()) for t in range(x.shape[1])] for i in range(len(x))]
    return torch.tensor([sorted(range(len(s)), key=lambda t: -s[t])[:k] for s in score])


@pytest.mark.parametrize("rule", ["similarity", "norm"])
def test_topk_equals_reference_on_selected_tokens(rule: str) -> None:
    image, text, mask, scale = inputs(4)
    k = 2
    loss, grads = loss_and_grads(filip(topk_image_tokens=k, topk_score=rule),
                                 image, text, mask, scale)
    keep = reference_topk(image[:, 1:], text, mask, k, rule)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    selected = leaves[0][:, 1:].gather(1, keep[..., None].expand(-1, -1, D))
    want = reference_filip(selected, leaves[1], mask, leaves[2])
    torch.testing.assert_close(loss, want.detach())
    for got, ref in zip(grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(got, ref)
    assert (grads[0].abs().sum(-1) > 0).sum(1).tolist() == [k] * N  # only kept tokens learn
    loss_all, _ = loss_and_grads(filip(topk_image_tokens=T_IMG), image, text, mask, scale)
    torch.testing.assert_close(loss_all, loss_and_grads(filip(), image, text, mask, scale)[0])


def test_metrics() -> None:
    """Identical one-hot tokens on both sides: every pair is its own best match."""
    eye = torch.eye(4, dtype=torch.float64)[:, None, :]  # (4, 1, 4)
    out = Outputs(image_tokens=eye.repeat(1, 3, 1), text_tokens=eye.repeat(1, 2, 1),
                  text_mask=torch.ones(4, 2), logit_scale=torch.tensor(10.0))
    metrics = FilipLoss()({}, out, Dist()).metrics
    assert metrics == {"acc_i2t": 1.0, "acc_t2i": 1.0, "logit_scale": 10.0, "image_tokens": 2.0}


def test_registry_and_param_errors() -> None:
    assert "filip" in list_objectives()
    assert FilipLoss.needs >= {"image_tokens", "text_tokens", "text_mask", "logit_scale"}
    with pytest.raises(UnknownNameError, match="'local', 'global'"):
        validate_spec(ObjectiveSpec(name="filip", params={"gather": "local_nograd"}))
    with pytest.raises(UnknownNameError, match="'similarity', 'norm'"):
        validate_spec(ObjectiveSpec(name="filip", params={"topk_score": "random"}))
    with pytest.raises(UnknownNameError, match="did you mean 'chunk'"):
        validate_spec(ObjectiveSpec(name="filip", params={"chunks": 2}))
    with pytest.raises(ValueError, match="topk_image_tokens must be >= 0"):
        validate_spec(ObjectiveSpec(name="filip", params={"topk_image_tokens": -1}))
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        validate_spec(ObjectiveSpec(name="filip", params={"chunk": -3}))


def test_clear_error_without_tokens() -> None:
    image, text, mask, scale = inputs()
    with pytest.raises(ValueError, match="needs Outputs.image_tokens"):
        FilipLoss()({}, Outputs(text_tokens=text, text_mask=mask, logit_scale=scale), Dist())
    with pytest.raises(ValueError, match="needs Outputs.text_mask"):
        FilipLoss()({}, Outputs(image_tokens=image, text_tokens=text, logit_scale=scale), Dist())
    with pytest.raises(ValueError, match="unpadded"):
        empty = mask.clone()
        empty[1] = 0
        FilipLoss()({}, Outputs(image_tokens=image, text_tokens=text, text_mask=empty,
                                logit_scale=scale), Dist())


def test_default_model_produces_what_filip_needs() -> None:
    """clip_tiny's dual encoder returns CLS-first projected image tokens and masked text tokens."""
    from vlmray.data import schema
    from vlmray.models import build_model
    from vlmray.recipes import recipe

    cfg = recipe("clip_tiny")
    model = build_model(cfg.model, image_size=32, vocab_size=cfg.data.vocab_size,
                        context_length=cfg.data.context_length)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.data.vocab_size, (2, 8), generator=g)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    batch = {schema.PIXELS: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                                          generator=g),
             schema.TOKENS: tokens * mask, schema.TOKEN_MASK: mask}
    out = model(batch, FilipLoss.needs)
    assert out.image_tokens.shape == (2, 1 + (32 // 8) ** 2, cfg.model.embed_dim)
    assert out.text_tokens.shape == (2, 8, cfg.model.embed_dim)
    assert out.text_mask is mask
    result = FilipLoss()(batch, out, Dist())
    result.loss.backward()
    assert torch.isfinite(result.loss) and model.image_proj.weight.grad.abs().sum() > 0
    assert result.metrics["image_tokens"] == 16


class TinyTokens(nn.Module):
    """Linear token encoders and a learnable log inverse temperature (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(D, D, dtype=torch.float64)
        self.text = nn.Linear(D, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, image: Tensor, text: Tensor, mask: Tensor) -> Outputs:
        return Outputs(image_tokens=self.image(image), text_tokens=self.text(text),
                       text_mask=mask, logit_scale=self.log_scale.exp())


MODES: list[dict[str, Any]] = [{"gather": "local"}, {"gather": "global", "chunk": 2},
                               {"gather": "local", "topk_image_tokens": 3, "topk_score": "norm"}]


def model_loss_and_grads(state: dict, rows: slice, params: dict, dist: Dist
                         ) -> tuple[float, dict[str, Tensor]]:
    model = TinyTokens()
    model.load_state_dict(state)
    image, text, mask, _ = inputs(5)
    result = filip(**params)({}, model(image[rows], text[rows], mask[rows]), dist)
    result.loss.backward()
    return result.loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict) -> list[tuple[float, dict]]:
    """Each rank: its N/W rows, local loss, backward; then loss and grads averaged as DDP does."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    results = []
    for params in MODES:
        loss, grads = model_loss_and_grads(state, rows, params, dist)
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= world_size
        results.append((dist.all_reduce_mean(loss).item(), grads))
    return results


def test_two_processes_match_one() -> None:
    """The key invariant: W=2 local losses and DDP-averaged grads == one process on N rows."""
    torch.manual_seed(0)
    state = TinyTokens().state_dict()
    ranks = run_gloo(_worker, W, state)
    for i, params in enumerate(MODES):
        loss, grads = model_loss_and_grads(state, slice(None), params, Dist())
        for res in ranks:
            dist_loss, dist_grads = res[i]
            assert dist_loss == pytest.approx(loss, abs=1e-10), params
            for name, grad in grads.items():
                torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0,
                                           msg=f"{params} {name}")
