"""SigLipLoss: the paper's equation written plainly, and 1 process vs 2 and 3 gloo processes.

    pytest tests/objectives/test_siglip.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.contrastive.siglip  # noqa: F401  (registers "siglip")
from tests.distributed._spawn import run_gloo
from vlmray._registry import UnknownNameError
from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import build_model
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, validate_spec
from vlmray.objectives.base import host_metrics
from vlmray.objectives.contrastive.siglip import SigLipLoss

N, D = 12, 5
MODES = [("ring", 0), ("gather", 0), ("ring", 4), ("gather", 5)]
# W=3 is the smallest ring where "send to r+1" and "send to r-1" are different peers: at W=2 a
# ring step (or its backward) sent the wrong way round gives the same numbers and would pass.
WORLD_SIZES = [2, 3]


def reference_loss_loops(x: Tensor, y: Tensor, t: Tensor, b: Tensor) -> Tensor:
    """L = -1/N sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), literally."""
    n = len(x)
    total = x.new_zeros(())
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (t * x[i].dot(y[j]) + b))
    return total / n


def reference_loss_dense(x: Tensor, y: Tensor, t: Tensor, b: Tensor) -> Tensor:
    """The same with the label matrix z = 2 I - 1 (what big_vision writes)."""
    z = 2 * torch.eye(len(x), dtype=x.dtype) - 1
    return -F.logsigmoid(z * (t * x @ y.T + b)).sum() / len(x)


def _leaves(seed: int = 0, n: int = N) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(image (n, D), text (n, D), log t, b): float64 leaves, normalised rows, SigLIP-ish init."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    log_t = torch.tensor(2.0, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    return tuple(v.requires_grad_() for v in (image, text, log_t, bias))  # type: ignore[return-value]


def _loss_and_grads(rows: slice, exchange: str, chunk: int, dist: Dist) -> tuple[float, list]:
    """This rank's local loss on ``rows`` of the global leaves, and d(loss)/d(leaves)."""
    image, text, log_t, bias = _leaves()
    loss_fn = build_objective(ObjectiveSpec(name="siglip",
                                            params={"exchange": exchange, "chunk": chunk}))
    out = Outputs(image_embeds=image[rows], text_embeds=text[rows], logit_scale=log_t.exp(),
                  logit_bias=bias)
    loss = loss_fn({}, out, dist).loss
    return loss.item(), list(torch.autograd.grad(loss, (image, text, log_t, bias)))


def _worker(rank: int, world_size: int) -> dict[Any, Any]:
    """Each rank: its N/W rows; raw grads, and loss and grads averaged over ranks as DDP does."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    out: dict[Any, Any] = {"rows": rows}
    for exchange, chunk in MODES:
        loss, grads = _loss_and_grads(rows, exchange, chunk, dist)
        out[("raw", exchange, chunk)] = [g.clone() for g in grads]
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad /= world_size
        out[(exchange, chunk)] = (dist.all_reduce_mean(loss).item(), grads)
    out["ddp"] = _ddp_grads(rows, dist)
    return out


class TinySigLip(nn.Module):
    """Two linear encoders, log t and b (float64): the DDP check's model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(D, D, dtype=torch.float64)
        self.text = nn.Linear(D, D, dtype=torch.float64)
        self.log_t = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))

    def forward(self, image: Tensor, text: Tensor) -> Outputs:
        return Outputs(image_embeds=F.normalize(self.image(image), dim=-1),
                       text_embeds=F.normalize(self.text(text), dim=-1),
                       logit_scale=self.log_t.exp(), logit_bias=self.bias)


def _ddp_grads(rows: slice, dist: Dist) -> dict[str, Tensor]:
    """A ring step under real DDP (one bucket per parameter, so its all-reduces interleave
    with the ring's backward sends), or in one process when ``dist`` has one worker."""
    model = TinySigLip()
    wrapped = model if dist.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=1e-6)
    image, text = (v.detach()[rows] for v in _leaves()[:2])
    SigLipLoss()({}, wrapped(image, text), dist).loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def multi_process(request: pytest.FixtureRequest) -> tuple[int, list[dict[Any, Any]]]:
    return request.param, run_gloo(_worker, request.param)


@pytest.mark.parametrize("exchange,chunk", MODES)
def test_single_process_matches_paper(exchange: str, chunk: int) -> None:
    image, text, log_t, bias = _leaves(seed=1, n=7)
    t = log_t.exp()
    loss_fn = SigLipLoss(SigLipLoss.Config(exchange=exchange, chunk=chunk))
    got = loss_fn({}, Outputs(image, text, logit_scale=t, logit_bias=bias), Dist()).loss
    want = reference_loss_loops(image, text, t, bias)
    torch.testing.assert_close(reference_loss_dense(image, text, t, bias), want)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (image, text, log_t, bias), retain_graph=True),
                    torch.autograd.grad(want, (image, text, log_t, bias))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("exchange,chunk", MODES)
def test_processes_match_one(multi_process: tuple[int, list], exchange: str, chunk: int) -> None:
    """The key invariant: mean local loss and DDP-averaged gradients (image, text, log t, b)
    equal one process's on the concatenated batch."""
    _, results = multi_process
    loss, grads = _loss_and_grads(slice(None), "ring", 0, Dist())
    for res in results:
        dist_loss, dist_grads = res[(exchange, chunk)]
        assert dist_loss == pytest.approx(loss, abs=1e-12)
        for name, a, b in zip(("image", "text", "log_t", "bias"), dist_grads, grads):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_real_ddp_matches_one_process(multi_process: tuple[int, list]) -> None:
    grads = _ddp_grads(slice(None), Dist())
    for res in multi_process[1]:
        for name, grad in grads.items():
            torch.testing.assert_close(res["ddp"][name], grad, atol=1e-12, rtol=1e-10, msg=name)


def test_ring_returns_other_ranks_text_gradients(multi_process: tuple[int, list]) -> None:
    """Before averaging, rank r's gradient on its own texts is d(sum_s L_s)/dY_r = W dL/dY_r:
    it carries the terms the other ranks computed with Y_r, which L_r alone does not."""
    world, results = multi_process
    _, grads = _loss_and_grads(slice(None), "ring", 0, Dist())
    for res in results:
        rows = res["rows"]
        text_grad = res[("raw", "ring", 0)][1]
        torch.testing.assert_close(text_grad[rows], world * grads[1][rows], atol=1e-12, rtol=1e-10)
        own_only = _own_rows_text_grad(rows, world)
        assert (own_only - text_grad[rows]).abs().max() > 1e-3


def _own_rows_text_grad(rows: slice, world: int) -> Tensor:
    """d L_r / d Y_r computed in one process: rank r's rows against all texts, / B."""
    image, text, log_t, bias = _leaves()
    logits = log_t.exp() * image[rows] @ text.T + bias
    z = -torch.ones_like(logits)
    z[torch.arange(logits.shape[0]), torch.arange(N)[rows]] = 1.0
    loss = -F.logsigmoid(z * logits).sum() / (N // world)
    return torch.autograd.grad(loss, text)[0][rows]


def test_chunked_equals_unchunked() -> None:
    image, text, log_t, bias = _leaves(seed=2, n=10)
    out = Outputs(image, text, logit_scale=log_t.exp(), logit_bias=bias)
    full = SigLipLoss()({}, out, Dist())
    for chunk in (1, 3, 10, 64):
        part = SigLipLoss(SigLipLoss.Config(chunk=chunk))({}, out, Dist())
        torch.testing.assert_close(part.loss, full.loss)
        assert host_metrics(part.metrics) == pytest.approx(host_metrics(full.metrics))
        leaves = (image, text, log_t, bias)
        for a, b in zip(torch.autograd.grad(part.loss, leaves, retain_graph=True),
                        torch.autograd.grad(full.loss, leaves, retain_graph=True)):
            torch.testing.assert_close(a, b)


def test_metrics() -> None:
    eye = torch.eye(4, dtype=torch.float64)
    text = eye[[0, 1, 3, 2]]  # rows 2 and 3 swapped: half the pairs are retrieved correctly
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    result = SigLipLoss()({}, Outputs(eye, text, logit_scale=t, logit_bias=b), Dist())
    sig_hi, sig_lo = (torch.sigmoid(torch.tensor(v)).item() for v in (5.0, -5.0))
    assert result.metrics == pytest.approx({
        "acc_i2t": 0.5, "pos_prob": (2 * sig_hi + 2 * sig_lo) / 4,
        "neg_prob": (2 * sig_hi + 10 * sig_lo) / 12, "logit_scale": 10.0, "logit_bias": -5.0})


def test_bf16_inputs_give_fp32_loss_and_bf16_grads() -> None:
    image, text, log_t, bias = (v.detach().to(torch.bfloat16).requires_grad_() for v in _leaves())
    out = Outputs(image, text, logit_scale=log_t.exp(), logit_bias=bias)
    loss = SigLipLoss()({}, out, Dist()).loss
    assert loss.dtype == torch.float32
    loss.backward()
    assert image.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.bfloat16


def test_params_are_validated() -> None:
    with pytest.raises(UnknownNameError, match="'ring', 'gather'"):
        validate_spec(ObjectiveSpec(name="siglip", params={"exchange": "allgather"}))
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        validate_spec(ObjectiveSpec(name="siglip", params={"chunk": -1}))
    validate_spec(ObjectiveSpec(name="siglip", params={"exchange": "gather", "chunk": 128}))


def test_missing_bias_is_a_clear_error() -> None:
    image, text, log_t, _ = _leaves()
    with pytest.raises(ValueError, match=r"needs Outputs\.logit_bias.*init_logit_bias"):
        SigLipLoss()({}, Outputs(image, text, logit_scale=log_t.exp()), Dist())
    assert "logit_bias" in SigLipLoss.needs


def test_model_has_bias_only_when_asked() -> None:
    tiny = dict(vision_kwargs={"patch_size": 16, "embed_dim": 8, "depth": 1, "num_heads": 2},
                embed_dim=8, text={"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 16})
    sizes = dict(image_size=32, vocab_size=64, context_length=8)
    plain = build_model(ModelConfig(**tiny), **sizes)
    siglip = build_model(ModelConfig(**tiny, init_temperature=0.1, init_logit_bias=-10.0),
                         **sizes)
    assert plain.logit_bias is None
    assert set(siglip.state_dict()) - set(plain.state_dict()) == {"logit_bias"}
    assert siglip.logit_bias.item() == -10.0 and siglip.logit_bias.requires_grad
    assert siglip.logit_scale.item() == pytest.approx(10.0)
    batch = {schema.PIXELS: torch.randn(2, 3, 32, 32), schema.TOKENS: torch.ones(2, 8).long(),
             schema.TOKEN_MASK: torch.ones(2, 8).long()}
    assert siglip(batch).logit_bias is siglip.logit_bias
    assert plain(batch).logit_bias is None
