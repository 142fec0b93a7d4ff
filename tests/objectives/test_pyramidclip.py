"""PyramidClipLoss: against loops over the paper's softened InfoNCE, against CLIP's label-smoothed
loss when every level coincides, clear errors, and 1 process vs 2 gloo processes on one batch.

    pytest tests/objectives/test_pyramidclip.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.contrastive.pyramidclip  # noqa: F401  (registers "pyramidclip")
from tests.distributed._spawn import run_gloo
from tests.objectives._two_process import assert_matches_one, ddp_average
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS, Outputs
from vlmray.objectives import build_objective, list_objectives, validate_spec
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.pyramidclip import PyramidClipLoss, softened_nce

N, W, D = 8, 2, 4
MODES = ("local", "global")
# slots that are not the defaults, so the test also checks which view is read
SLOTS = {"local_view": 1, "summary_view": 2, "attribute_view": 0}


def reference_pyramid_loss(levels: dict[str, Tensor], scale: Tensor, softening: float,
                           w_peer: float, w_cross: float) -> Tensor:
    """The equations by loops: y_ii = 1 - a, y_ij = a/(N-1); L(X, Y) symmetric; weighted mean
    of peer (G,T_s), (L,T_o), (L,T_a) and cross (G,T_a), (L,T_s)."""
    n = levels["global"].shape[0]

    def nce(x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(())
        for i in range(n):
            scores = torch.stack([scale * x[i] @ y[k] for k in range(n)])
            log_z = torch.logsumexp(scores, dim=0)
            for j in range(n):
                target = 1 - softening if j == i else softening / (n - 1)
                total = total - target * (scores[j] - log_z)
        return total / n

    def pair(image: str, text: str) -> Tensor:
        x, y = levels[image], levels[text]
        return (nce(x, y) + nce(y, x)) / 2

    peer = pair("global", "summary") + pair("local", "caption") + pair("local", "attributes")
    cross = pair("global", "attributes") + pair("local", "summary")
    return (w_peer * peer + w_cross * cross) / (3 * w_peer + 2 * w_cross)


def _levels(seed: int, n: int = N) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = ("global", "local", "caption", "summary", "attributes")
    return {k: F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
            .requires_grad_() for k in names}


def _outputs(levels: dict[str, Tensor], scale: Tensor) -> Outputs:
    """Outputs whose view tensors put the levels in the slots of ``SLOTS``."""
    other = torch.zeros_like(levels["global"])
    views = torch.stack([other, levels["local"]], dim=1)  # (B, 2, D): local in slot 1
    texts = torch.stack([levels["attributes"], other, levels["summary"]], dim=1)  # (B, 3, D)
    return Outputs(image_embeds=levels["global"], text_embeds=levels["caption"],
                   logit_scale=scale, extra={IMAGE_VIEW_EMBEDS: views, TEXT_VIEW_EMBEDS: texts})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("softening", "w_peer", "w_cross"),
                         [(0.2, 1.0, 1.0), (0.0, 1.0, 0.5), (0.5, 0.0, 2.0)])
def test_single_process_matches_loop_reference(mode: str, softening: float, w_peer: float,
                                               w_cross: float) -> None:
    levels = _levels(1)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    cfg = PyramidClipLoss.Config(**SLOTS, gather=mode, softening=softening,
                                 peer_weight=w_peer, cross_weight=w_cross)
    got = PyramidClipLoss(cfg)({}, _outputs(levels, scale), Dist()).loss
    want = reference_pyramid_loss(levels, scale, softening, w_peer, w_cross)
    torch.testing.assert_close(got, want)
    inputs = (*levels.values(), scale)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b)


def test_equals_label_smoothed_clip_when_levels_coincide() -> None:
    """All image levels = u, all text levels = v: every pair is CLIP with e = a N / (N - 1)."""
    base = _levels(2)
    image, text = base["global"], base["caption"]
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    same = {"global": image, "local": image, "caption": text, "summary": text,
            "attributes": text}
    got = PyramidClipLoss(PyramidClipLoss.Config(**SLOTS, softening=0.3))(
        {}, _outputs(same, scale), Dist()).loss
    clip = ClipLoss(ClipLoss.Config(label_smoothing=0.3 * N / (N - 1)))
    want = clip({}, Outputs(image, text, logit_scale=scale), Dist()).loss
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (image, text, scale)),
                    torch.autograd.grad(want, (image, text, scale))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_softened_nce_and_metrics() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 2, 2])
    want = F.cross_entropy(logits, labels, label_smoothing=0.25 * 7 / 6)
    torch.testing.assert_close(softened_nce(logits, labels, 0.25), want)
    assert softened_nce(logits[:, :1], torch.zeros(5, dtype=torch.long), 0.5).item() == 0.0
    # uniform logits: every pair costs log N whatever the softening
    flat = torch.full((4, D), 0.5, dtype=torch.float64)
    result = PyramidClipLoss()({}, Outputs(flat, flat, logit_scale=torch.tensor(2.0), extra={
        IMAGE_VIEW_EMBEDS: flat[:, None], TEXT_VIEW_EMBEDS: torch.stack([flat, flat], 1)}),
        Dist())
    assert result.loss.item() == pytest.approx(math.log(4))
    assert {"loss_peer", "loss_cross", "loss_global_summary", "loss_local_summary", "acc_i2t",
            "acc_t2i"} <= set(result.metrics)
    assert result.metrics["loss_cross"] == pytest.approx(math.log(4))
    assert result.metrics["logit_scale"] == 2.0


def test_needs_and_clear_errors() -> None:
    assert {IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS, "image_embeds", "text_embeds",
            "logit_scale"} <= PyramidClipLoss.needs
    levels = _levels(4, n=4)
    scale = torch.tensor(1.0, dtype=torch.float64)
    out = _outputs(levels, scale)
    with pytest.raises(ValueError, match="local_view=5 but the batch has 2 image view"):
        PyramidClipLoss(PyramidClipLoss.Config(local_view=5))({}, out, Dist())
    del out.extra[TEXT_VIEW_EMBEDS]
    with pytest.raises(ValueError, match="text_view_embeds.*data.views.text"):
        PyramidClipLoss()({}, out, Dist())
    wrong = _outputs(levels, scale)
    wrong.extra[IMAGE_VIEW_EMBEDS] = wrong.extra[IMAGE_VIEW_EMBEDS][:, :, :2]
    with pytest.raises(ValueError, match=r"image view embeddings \(4, 2, 2\) are not"):
        PyramidClipLoss(PyramidClipLoss.Config(**SLOTS))({}, wrong, Dist())


@pytest.mark.parametrize(("params", "message"), [
    ({"summary_view": 1, "attribute_view": 1}, "must be different text view slots"),
    ({"local_view": -1}, "local_view must be an int >= 0"),
    ({"softening": 1.0}, r"softening must be in \[0, 1\)"),
    ({"cross_weight": -0.5}, "cross_weight must be a finite number >= 0"),
    ({"peer_weight": 0.0, "cross_weight": 0.0}, "both 0"),
    ({"local_view": 0.5}, "expects int"),
])
def test_registry_validates_params(params: dict[str, Any], message: str) -> None:
    assert "pyramidclip" in list_objectives()
    with pytest.raises(ValueError, match=message):
        validate_spec(ObjectiveSpec(name="pyramidclip", params=params))


def test_registry_builds_and_lists_choices() -> None:
    loss_fn = build_objective(ObjectiveSpec(name="pyramidclip", params={"gather": "global",
                                                                         "softening": 0.1}))
    assert isinstance(loss_fn, PyramidClipLoss) and loss_fn.cfg.gather == "global"
    with pytest.raises(UnknownNameError, match="valid choices: 'local', 'global'"):
        validate_spec(ObjectiveSpec(name="pyramidclip", params={"gather": "local_nograd"}))
    with pytest.raises(UnknownNameError, match="did you mean 'softening'"):
        validate_spec(ObjectiveSpec(name="pyramidclip", params={"softenning": 0.1}))


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


class TinyPyramid(nn.Module):
    """Two linear encoders shared by every level, and a learnable log inverse temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, D, dtype=torch.float64)
        self.text = nn.Linear(6, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, pixels: Tensor, pixel_views: Tensor, tokens: Tensor,
                token_views: Tensor) -> Outputs:
        """pixels (B, 5), pixel_views (B, 2, 5), tokens (B, 6), token_views (B, 3, 6)."""
        return Outputs(image_embeds=F.normalize(self.image(pixels), dim=-1),
                       text_embeds=F.normalize(self.text(tokens), dim=-1),
                       logit_scale=self.log_scale.exp(),
                       extra={IMAGE_VIEW_EMBEDS: F.normalize(self.image(pixel_views), dim=-1),
                              TEXT_VIEW_EMBEDS: F.normalize(self.text(token_views), dim=-1)})


def _setup() -> tuple[dict[str, Tensor], list[Tensor]]:
    """Fixed weights and a global batch of N rows (image, 2 image views, text, 3 text views)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    shapes = ((N, 5), (N, 2, 5), (N, 6), (N, 3, 6))
    return TinyPyramid().state_dict(), [torch.randn(*s, generator=g, dtype=torch.float64)
                                        for s in shapes]


def _loss_and_grads(state: dict, inputs: list[Tensor], mode: str,
                    dist: Dist) -> tuple[float, dict[str, Tensor]]:
    model = TinyPyramid()
    model.load_state_dict(state)
    loss_fn = build_objective(ObjectiveSpec(name="pyramidclip", params={**SLOTS, "gather": mode,
                                                                         "cross_weight": 0.5}))
    loss = loss_fn({}, model(*inputs), dist).loss
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, inputs: list[Tensor]) -> dict[str, Any]:
    """Each rank: its N/W rows, its loss, backward; then the DDP average of loss and grads."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    return {mode: ddp_average(*_loss_and_grads(state, [x[rows] for x in inputs], mode, dist),
                              dist)
            for mode in MODES}


@pytest.fixture(scope="module")
def two_process() -> list[dict[str, Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(two_process: list[dict[str, Any]], mode: str) -> None:
    """Same loss and same DDP-averaged gradients as one process on the full batch."""
    assert_matches_one([res[mode] for res in two_process],
                       *_loss_and_grads(*_setup(), "local", Dist()))
