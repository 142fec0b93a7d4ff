"""DeCLIP's NNS loss: against a plain reference, the queue, index mode, and 1 vs 2 gloo processes.

    pytest tests/objectives/test_declip_nns.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models import NN_TEXT_EMBEDS
from vlmray.models.outputs import Outputs
from vlmray.objectives import ObjectiveMix, build_objective, validate_spec
from vlmray.objectives.contrastive.declip_nns import DeclipNNSLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, W, D = 8, 2, 4


def unit(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def reference_nns(image: Tensor, nn_texts: Tensor, scale: Tensor) -> Tensor:
    """-1/N sum_i log softmax_j(s u_i . NN(v_j))[i], written out."""
    logits = scale * image @ nn_texts.T
    return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()


def reference_nn(text: Tensor, queue: Tensor) -> Tensor:
    """NN(v_i) = argmax over the queue rows q of v_i . q."""
    return queue[(text @ queue.T).argmax(dim=1)]


def queue_loss(queue_size: int = 16, gather: str = "local") -> DeclipNNSLoss:
    return build_objective(ObjectiveSpec(name="declip_nns", params={
        "source": "queue", "queue_size": queue_size, "gather": gather}))


def outputs(image: Tensor, text: Tensor | None, scale: Tensor, nn_text: Tensor | None = None
            ) -> Outputs:
    extra = {} if nn_text is None else {NN_TEXT_EMBEDS: nn_text}
    return Outputs(image_embeds=image, text_embeds=text, logit_scale=scale, extra=extra)


@pytest.mark.parametrize("gather", ["local", "global"])
def test_queue_mode_matches_reference(gather: str) -> None:
    loss_fn = queue_loss(gather=gather)
    old = unit(12, D, seed=0).float()
    loss_fn.enqueue(old)                                             # 12 of 16 rows filled
    image = unit(N, D, seed=1).requires_grad_()
    text, scale = unit(N, D, seed=2), torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    result = loss_fn({}, outputs(image, text, scale), Dist())
    nn_texts = reference_nn(text.float(), old).double()
    expected = reference_nns(image, nn_texts, scale)
    torch.testing.assert_close(result.loss, expected)
    for a, b in zip(torch.autograd.grad(result.loss, (image, scale)),
                    torch.autograd.grad(expected, (image, scale))):
        torch.testing.assert_close(a, b)
    sims = (text.float() @ old.T).max(dim=1).values.mean().item()
    assert result.metrics["nn_sim"] == pytest.approx(sims, abs=1e-6)
    assert result.metrics["queue_fill"] == 1.0 and result.metrics["queue_empty"] == 0.0
    hits = (image @ nn_texts.T).argmax(dim=1).eq(torch.arange(N)).double().mean().item()
    assert result.metrics["nn_acc"] == pytest.approx(hits)


def test_empty_queue_gives_zero_loss_then_fills() -> None:
    loss_fn = queue_loss()
    image = unit(N, D, seed=1).requires_grad_()
    text = unit(N, D, seed=2)
    result = loss_fn({}, outputs(image, text, torch.tensor(5.0)), Dist())
    assert result.loss.item() == 0.0 and result.metrics["queue_empty"] == 1.0
    result.loss.backward()                                           # connected, zero grads
    assert torch.equal(image.grad, torch.zeros_like(image))
    assert result.metrics["queue_fill"] == N / 16
    torch.testing.assert_close(loss_fn.queue[:N], text.float())


def test_queue_is_searched_before_this_steps_texts_go_in() -> None:
    """A row never finds its own caption within a step; a step later the same texts do."""
    loss_fn = queue_loss()
    loss_fn.enqueue(unit(4, D, seed=0).float())
    image, text = unit(N, D, seed=1), unit(N, D, seed=2)
    first = loss_fn({}, outputs(image, text, torch.tensor(5.0)), Dist())
    assert first.metrics["nn_sim"] < 0.99                            # own caption not found
    again = loss_fn({}, outputs(image, text, torch.tensor(5.0)), Dist())
    assert again.metrics["nn_sim"] == pytest.approx(1.0, abs=1e-6)   # now it is in the queue


def test_queue_is_fifo_and_wraps_around() -> None:
    loss_fn = queue_loss(queue_size=5)
    rows = torch.arange(13, dtype=torch.float32)[:, None].repeat(1, D)   # row r = [r, r, ...]
    loss_fn.enqueue(rows[0:3])
    assert (int(loss_fn.queue_ptr), int(loss_fn.queue_count)) == (3, 3)
    loss_fn.enqueue(rows[3:6])                                        # slots 3, 4, 0
    assert loss_fn.queue[:, 0].tolist() == [5, 1, 2, 3, 4]
    assert (int(loss_fn.queue_ptr), int(loss_fn.queue_count)) == (1, 5)
    loss_fn.enqueue(rows[6:13])                                       # 7 > 5: the last 5 stay
    assert (int(loss_fn.queue_ptr), int(loss_fn.queue_count)) == (3, 5)
    assert loss_fn.queue[:, 0].tolist() == [10, 11, 12, 8, 9]         # oldest (8) at the ptr


def test_queue_checkpoints_through_the_state_dict() -> None:
    src = queue_loss(queue_size=6)
    src({}, outputs(unit(N, D, seed=1), unit(N, D, seed=2), torch.tensor(5.0)), Dist())
    dst = queue_loss(queue_size=6)
    assert dst.queue.shape == (0, 0)                                  # width known lazily
    dst.load_state_dict(src.state_dict())
    for name in ("queue", "queue_ptr", "queue_count"):
        assert torch.equal(getattr(dst, name), getattr(src, name)), name


@pytest.mark.parametrize("gather", ["local", "global"])
def test_index_mode_uses_nn_text_embeds(gather: str) -> None:
    loss_fn = build_objective(ObjectiveSpec(name="declip_nns",
                                            params={"source": "index", "gather": gather}))
    image, nn_text = unit(N, D, seed=1).requires_grad_(), unit(N, D, seed=3).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64)
    result = loss_fn({}, outputs(image, unit(N, D, seed=2), scale, nn_text), Dist())
    expected = reference_nns(image, nn_text, scale)
    torch.testing.assert_close(result.loss, expected)
    for a, b in zip(torch.autograd.grad(result.loss, (image, nn_text)),
                    torch.autograd.grad(expected, (image, nn_text))):
        torch.testing.assert_close(a, b)
    assert set(result.metrics) == {"nn_acc", "nn_sim"}
    assert loss_fn.queue.numel() == 0                                  # index mode: no queue


def test_index_mode_without_nn_text_embeds_is_a_clear_error() -> None:
    loss_fn = build_objective(ObjectiveSpec(name="declip_nns", params={"source": "index"}))
    with pytest.raises(ValueError, match="nn_text_embeds.*nn_tokens"):
        loss_fn({}, outputs(unit(N, D, seed=1), unit(N, D, seed=2), torch.tensor(1.0)), Dist())


def test_needs_follow_the_source() -> None:
    queue = build_objective(ObjectiveSpec(name="declip_nns"))
    index = build_objective(ObjectiveSpec(name="declip_nns", params={"source": "index"}))
    assert queue.needs == {"image_embeds", "text_embeds", "logit_scale"}
    assert index.needs == {"image_embeds", "logit_scale", NN_TEXT_EMBEDS}
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip"),
                                   ObjectiveSpec(name="declip_nns", params={"source": "index"})])
    assert NN_TEXT_EMBEDS in mix.needs


def test_registry_and_param_validation() -> None:
    assert isinstance(build_objective(ObjectiveSpec(name="declip_nns")), DeclipNNSLoss)
    with pytest.raises(UnknownNameError, match="'queue', 'index'"):
        validate_spec(ObjectiveSpec(name="declip_nns", params={"source": "faiss"}))
    with pytest.raises(UnknownNameError, match="'local', 'global'"):
        validate_spec(ObjectiveSpec(name="declip_nns", params={"gather": "local_nograd"}))
    with pytest.raises(ValueError, match="queue_size must be > 0"):
        validate_spec(ObjectiveSpec(name="declip_nns", params={"queue_size": 0}))
    with pytest.raises(ValueError, match="expects int"):
        validate_spec(ObjectiveSpec(name="declip_nns", params={"queue_size": 1.5}))
    with pytest.raises(UnknownNameError, match="did you mean 'queue_size'"):
        validate_spec(ObjectiveSpec(name="declip_nns", params={"queue_sise": 8}))


# --- the model produces extra["nn_text_embeds"] from NN_TOKENS -----------------------------


def test_dual_encoder_encodes_nn_captions() -> None:
    from tests.models.test_dual_encoder import B, batch, make, tiny
    from vlmray.data import schema

    model = make(tiny())
    b, other = batch(), batch(seed=4)
    b[schema.NN_TOKENS], b[schema.NN_TOKEN_MASK] = other[schema.TOKENS], other[schema.TOKEN_MASK]
    with torch.no_grad():
        out = model(b, needs={NN_TEXT_EMBEDS})
        want, _ = model.encode_text(other[schema.TOKENS], other[schema.TOKEN_MASK])
        assert NN_TEXT_EMBEDS not in model(b).extra                   # only when needed
    assert out.extra[NN_TEXT_EMBEDS].shape == (B, 16)
    torch.testing.assert_close(out.extra[NN_TEXT_EMBEDS], want)
    with pytest.raises(ValueError, match="nn_tokens"):
        model(batch(), needs={NN_TEXT_EMBEDS})


# --- 1 process vs 2 gloo processes ---------------------------------------------------------


class TinyNNS(nn.Module):
    """Linear image and text encoders (the text one also encodes NN captions), float64."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, D, dtype=torch.float64)
        self.text = nn.Linear(6, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor, nn_tokens: Tensor) -> Outputs:
        return outputs(F.normalize(self.image(pixels), dim=-1),
                       F.normalize(self.text(tokens), dim=-1), self.log_scale.exp(),
                       F.normalize(self.text(nn_tokens), dim=-1))


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Weights and two steps' global batches: pixels (2, N, 5), tokens, nn_tokens (2, N, 6)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rand = [torch.randn(2, N, k, generator=g, dtype=torch.float64) for k in (5, 6, 6)]
    return TinyNNS().state_dict(), *rand


def _steps(state: dict, pixels: Tensor, tokens: Tensor, nn_tokens: Tensor, params: dict,
           dist: Dist) -> tuple[float, dict[str, Tensor], Tensor]:
    """Two steps (the first fills the queue); loss and DDP-averaged grads of the second."""
    model, loss_fn = TinyNNS(), build_objective(ObjectiveSpec(name="declip_nns", params=params))
    model.load_state_dict(state)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        result = loss_fn({}, model(pixels[step], tokens[step], nn_tokens[step]), dist)
        result.loss.backward()
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in model.named_parameters()}
    if dist.world_size > 1:
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= dist.world_size
    return dist.all_reduce_mean(result.loss).item(), grads, loss_fn.queue.clone()


MODES = [{"source": s, "gather": g, "queue_size": 12}
         for s in ("index", "queue") for g in ("local", "global")]


def _worker(rank: int, world_size: int, state: dict, *data: Tensor) -> list[Any]:
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    local = [x[:, rows] for x in data]
    return [_steps(state, *local, params, Dist.current()) for params in MODES]


@pytest.fixture(scope="module")
def two_process() -> list[list[Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("i", range(len(MODES)), ids=[f"{m['source']}-{m['gather']}"
                                                      for m in MODES])
def test_two_processes_match_one(two_process: list[list[Any]], i: int) -> None:
    """Same loss and (DDP-averaged) gradients as one process on the concatenated batch; the
    queue is identical on both ranks and equals the single-process queue."""
    loss, grads, queue = _steps(*_setup(), MODES[i], Dist())
    assert grads["image.weight"].abs().max() > 0
    if MODES[i]["source"] == "index":
        assert grads["text.weight"].abs().max() > 0                  # NN captions get gradient
    for rank_result in two_process:
        dist_loss, dist_grads, dist_queue = rank_result[i]
        assert dist_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(dist_queue, queue)
    assert torch.equal(two_process[0][i][2], two_process[1][i][2])
