"""ClipLoss: against a plain reference, and 1 process vs 2 gloo processes on the same batch.

    pytest tests/objectives/test_clip.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective
from vlmray.objectives.contrastive.clip import ClipLoss

N, W = 8, 2
MODES = [("local", 0.0), ("global", 0.0), ("local_nograd", 0.0), ("local", 0.1)]


def reference_clip_loss(image: Tensor, text: Tensor, scale: Tensor, eps: float = 0.0) -> Tensor:
    """(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2 over the whole batch."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels, label_smoothing=eps)
            + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2


class TinyClip(nn.Module):
    """Two linear encoders and a learnable log inverse temperature (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, 4, dtype=torch.float64)
        self.text = nn.Linear(6, 4, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor) -> Outputs:
        return Outputs(
            image_embeds=F.normalize(self.image(pixels), dim=-1),
            text_embeds=F.normalize(self.text(tokens), dim=-1),
            logit_scale=self.log_scale.exp(),
        )


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Fixed weights and a global batch of N (image, text) inputs."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = TinyClip().state_dict()
    return state, torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randn(N, 6, generator=g, dtype=torch.float64)


def _loss_and_grads(state: dict, pixels: Tensor, tokens: Tensor, mode: str, eps: float, dist: Dist) -> tuple[float, dict]:
    model = TinyClip()
    model.load_state_dict(state)
    loss_fn = build_objective(ObjectiveSpec(name="clip", params={"gather": mode, "label_smoothing": eps}))
    result = loss_fn({}, model(pixels, tokens), dist)
    result.loss.backward()
    return result.loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, pixels: Tensor, tokens: Tensor) -> dict[str, Any]:
    """Each rank: its N/W rows, local loss, backward; then average loss and grads as DDP does."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    out = {}
    for mode, eps in MODES:
        loss, grads = _loss_and_grads(state, pixels[rows], tokens[rows], mode, eps, dist)
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= world_size
        out[(mode, eps)] = (dist.all_reduce_mean(loss).item(), grads)
    out["ddp"] = _ddp_grads(state, pixels[rows], tokens[rows], dist)
    return out


def _ddp_grads(state: dict, pixels: Tensor, tokens: Tensor, dist: Dist) -> dict[str, Tensor]:
    """The same "local" step under real DDP, whose bucketed all-reduce runs inside backward."""
    model = TinyClip()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    ClipLoss()({}, ddp(pixels, tokens), dist).loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.fixture(scope="module")
def two_process() -> list[dict[str, Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_single_process_matches_reference(eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    result = ClipLoss(ClipLoss.Config(label_smoothing=eps))({}, Outputs(image, text, logit_scale=scale), Dist())
    expected = reference_clip_loss(image, text, scale, eps)
    torch.testing.assert_close(result.loss, expected)
    got = torch.autograd.grad(result.loss, (image, text, scale))
    want = torch.autograd.grad(expected, (image, text, scale))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_metrics_and_needs() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    text = eye[[0, 1, 3, 2]]  # rows 2 and 3 swapped: half the pairs are retrieved correctly
    result = ClipLoss()({}, Outputs(eye, text, logit_scale=torch.tensor(10.0)), Dist())
    assert result.metrics == {"acc_i2t": 0.5, "acc_t2i": 0.5, "logit_scale": 10.0}
    assert ClipLoss.needs == {"image_embeds", "text_embeds", "logit_scale"}
    with pytest.raises(ValueError, match="text_embeds"):
        ClipLoss()({}, Outputs(image_embeds=eye, logit_scale=torch.tensor(1.0)), Dist())


@pytest.mark.parametrize("mode,eps", [m for m in MODES if m[0] != "local_nograd"])
def test_two_processes_match_one(two_process: list[dict[str, Any]], mode: str, eps: float) -> None:
    """The key invariant: same loss and same (DDP-averaged) gradients as one process on N."""
    loss, grads = _loss_and_grads(*_setup(), mode, eps, Dist())
    for res in two_process:
        dist_loss, dist_grads = res[(mode, eps)]
        assert dist_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_local_nograd_matches_loss_but_not_gradients(two_process: list[dict[str, Any]]) -> None:
    loss, grads = _loss_and_grads(*_setup(), "local", 0.0, Dist())
    dist_loss, dist_grads = two_process[0][("local_nograd", 0.0)]
    assert dist_loss == pytest.approx(loss, abs=1e-6)
    for name in ("image.weight", "text.weight"):
        assert (dist_grads[name] - grads[name]).abs().max() > 1e-3, name
    torch.testing.assert_close(dist_grads["log_scale"], grads["log_scale"])  # s is not gathered


def test_real_ddp_matches_one_process(two_process: list[dict[str, Any]]) -> None:
    _, grads = _loss_and_grads(*_setup(), "local", 0.0, Dist())
    for res in two_process:
        for name, grad in grads.items():
            torch.testing.assert_close(res["ddp"][name], grad, atol=1e-6, rtol=0, msg=name)
