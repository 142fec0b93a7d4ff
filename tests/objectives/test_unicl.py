"""UniClLoss: against a loop over the paper's equation, against CLIP when no label repeats, and
1 process vs 2 gloo processes on the same global batch.

    pytest tests/objectives/test_unicl.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.contrastive.unicl  # noqa: F401  (registers "unicl")
from tests.distributed._spawn import run_gloo
from tests.objectives._two_process import assert_matches_one, ddp_average
from tests.objectives.test_clip import TinyClip
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data.schema import LABEL
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives, validate_spec
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.unicl import UniClLoss

N, W = 8, 2
MIXED = [3, -1, 3, 5, -1, 5, 5, 0]   # repeated labels, caption-only rows, a singleton class
MODES = ("local", "global")


def reference_unicl_loss(image: Tensor, text: Tensor, scale: Tensor, labels: list[int]) -> Tensor:
    """L = (L_i2t + L_t2i) / 2, each -1/N sum_i 1/|P_i| sum_{j in P_i} log softmax, by loops."""
    n = len(labels)
    positives = [[j for j in range(n) if j == i or labels[i] == labels[j] >= 0] for i in range(n)]

    def direction(a: Tensor, b: Tensor) -> Tensor:
        total = a.new_zeros(())
        for i in range(n):
            log_z = torch.logsumexp(torch.stack([scale * a[i] @ b[k] for k in range(n)]), dim=0)
            row = sum(scale * a[i] @ b[j] - log_z for j in positives[i])
            total = total - row / len(positives[i])
        return total / n

    return (direction(image, text) + direction(text, image)) / 2


def _embeds(seed: int, n: int = N) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(5.0, dtype=torch.float64)
    return image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()


def _loss(loss_fn: nn.Module, labels: list[int] | None, image: Tensor, text: Tensor,
          scale: Tensor) -> Tensor:
    batch = {} if labels is None else {LABEL: torch.tensor(labels)}
    return loss_fn(batch, Outputs(image, text, logit_scale=scale), Dist()).loss


@pytest.mark.parametrize("mode", MODES)
def test_single_process_matches_loop_reference(mode: str) -> None:
    image, text, scale = _embeds(1)
    got = _loss(UniClLoss(UniClLoss.Config(gather=mode)), MIXED, image, text, scale)
    want = reference_unicl_loss(image, text, scale, MIXED)
    torch.testing.assert_close(got, want)
    grads_got = torch.autograd.grad(got, (image, text, scale))
    grads_want = torch.autograd.grad(want, (image, text, scale))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("labels", [list(range(10, 10 + N)), [-1] * N, [7, -1, 2, -1, 0, 1, 3, 4]])
def test_equals_clip_when_no_label_repeats(labels: list[int]) -> None:
    image, text, scale = _embeds(2)
    unicl = _loss(UniClLoss(), labels, image, text, scale)
    clip = _loss(ClipLoss(), None, image, text, scale)
    torch.testing.assert_close(unicl, clip, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(unicl, (image, text, scale)),
                    torch.autograd.grad(clip, (image, text, scale))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_targets_and_metrics() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    labels = torch.tensor([1, 1, -1, -1])
    y = UniClLoss().targets(labels, Dist())
    assert y.tolist() == [[True, True, False, False], [True, True, False, False],
                          [False, False, True, False], [False, False, False, True]]
    text = eye[[1, 0, 3, 2]]  # rows 0/1 swapped (same class: still hits), 2/3 swapped (misses)
    result = UniClLoss()({LABEL: labels}, Outputs(eye, text, logit_scale=torch.tensor(10.0)),
                         Dist())
    assert result.metrics == {"acc_i2t": 0.5, "acc_t2i": 0.5, "positives": 1.5,
                              "labelled": 0.5, "logit_scale": 10.0}
    # uniform logits: every row's loss is log N, whatever its positives
    flat = torch.full((4, 4), 0.5, dtype=torch.float64)
    same = UniClLoss()({LABEL: labels}, Outputs(flat, flat, logit_scale=torch.tensor(1.0)),
                       Dist())
    assert same.loss.item() == pytest.approx(math.log(4))


def test_needs_and_clear_errors() -> None:
    assert UniClLoss.needs == {"image_embeds", "text_embeds", "logit_scale", LABEL}
    image, text, scale = _embeds(3, n=4)
    with pytest.raises(ValueError, match="needs the batch column 'label'"):
        _loss(UniClLoss(), None, image, text, scale)
    with pytest.raises(ValueError, match="3 labels for 4 embeddings"):
        _loss(UniClLoss(), [0, 1, 2], image, text, scale)
    with pytest.raises(ValueError, match="text_embeds"):
        UniClLoss()({LABEL: torch.zeros(4, dtype=torch.long)},
                    Outputs(image_embeds=image, logit_scale=scale), Dist())


def test_registry_validates_params() -> None:
    assert "unicl" in list_objectives()
    loss_fn = build_objective(ObjectiveSpec(name="unicl", params={"gather": "global"}))
    assert isinstance(loss_fn, UniClLoss) and loss_fn.cfg.gather == "global"
    with pytest.raises(UnknownNameError, match="valid choices: 'local', 'global'"):
        validate_spec(ObjectiveSpec(name="unicl", params={"gather": "local_nograd"}))
    with pytest.raises(UnknownNameError, match="valid params: gather"):
        validate_spec(ObjectiveSpec(name="unicl", params={"label_smoothing": 0.1}))


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Fixed weights, a global batch of N inputs, and labels whose classes span both ranks."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pixels = torch.randn(N, 5, generator=g, dtype=torch.float64)
    tokens = torch.randn(N, 6, generator=g, dtype=torch.float64)
    return TinyClip().state_dict(), pixels, tokens, torch.tensor(MIXED)


def _loss_and_grads(state: dict, pixels: Tensor, tokens: Tensor, labels: Tensor, mode: str,
                    dist: Dist) -> tuple[float, dict[str, Tensor]]:
    model = TinyClip()
    model.load_state_dict(state)
    loss_fn = build_objective(ObjectiveSpec(name="unicl", params={"gather": mode}))
    loss = loss_fn({LABEL: labels}, model(pixels, tokens), dist).loss
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, pixels: Tensor, tokens: Tensor,
            labels: Tensor) -> dict[str, Any]:
    """Each rank: its N/W rows, its loss, backward; then the DDP average of loss and grads."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    return {mode: ddp_average(*_loss_and_grads(state, pixels[rows], tokens[rows], labels[rows],
                                               mode, dist), dist)
            for mode in MODES}


@pytest.fixture(scope="module")
def two_process() -> list[dict[str, Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(two_process: list[dict[str, Any]], mode: str) -> None:
    """Same loss and same DDP-averaged gradients as one process on the full batch."""
    assert_matches_one([res[mode] for res in two_process],
                       *_loss_and_grads(*_setup(), "global", Dist()))
