"""NLIP's noise completion on 2 real gloo processes: the whole objective (harmonised loss,
weighted captioning, weighted image-completion InfoNCE, prepare) gives the same losses and
averaged gradients as one process on the full batch.

    pytest tests/objectives/test_nlip_completion_dist.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from tests.distributed._spawn import run_gloo
from tests.objectives.test_nlip_completion import N, TinyModel, data, objective, set_gmm
from vlmray.distributed import Dist

pytestmark = pytest.mark.usefixtures("one_torch_thread")
W = 2


# --- 1 process vs 2 gloo processes ---------------------------------------------------------


STEPS = 2


def _setup() -> tuple[dict[str, Tensor], dict[str, Tensor], list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    model = TinyModel().eval()
    return model.state_dict(), objective(model).state_dict(), [data(10 + k) for k in range(STEPS)]


def _steps(model_state: dict, obj_state: dict, batches: list[dict[str, Tensor]], dist: Dist
           ) -> tuple[list[float], dict[str, Tensor], dict[str, Tensor]]:
    """STEPS training steps (no optimiser) with a fitted GMM; losses, last step's averaged
    grads of the model and the objective (the decoder), and the objective's state."""
    model = TinyModel().eval()
    model.load_state_dict(model_state)
    obj = objective(model)
    obj.load_state_dict(obj_state)
    set_gmm(obj, [1.9, 2.3], [0.02, 0.02], [0.6, 0.4])
    losses: list[float] = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        obj.zero_grad(set_to_none=True)
        batch = {**batch, **obj.prepare(batch)}
        result = obj(batch, model(batch, obj.needs), dist)
        result.loss.backward()
        losses.append(dist.all_reduce_mean(result.loss).item())
    named = [*(("model." + k, p) for k, p in model.named_parameters()),
             *(("obj." + k, p) for k, p in obj.named_parameters())]
    out = {k: p.grad.clone() for k, p in named if p.grad is not None}
    if dist.world_size > 1:
        for grad in out.values():
            torch.distributed.all_reduce(grad)
            grad /= dist.world_size
    return losses, out, {k: v.clone() for k, v in obj.state_dict().items()}


def _worker(rank: int, world_size: int, model_state: dict, obj_state: dict,
            batches: list[dict[str, Tensor]]) -> Any:
    torch.set_num_threads(1)
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    local = [{k: v[rows] for k, v in b.items()} for b in batches]
    return _steps(model_state, obj_state, local, Dist.current())


def test_two_processes_match_one() -> None:
    """Same losses and averaged gradients (towers, scale, decoder) as one process on the full
    batch, with noisy and clean rows (a fitted GMM), and the same GMM state on both ranks."""
    losses, grad, state = _steps(*_setup(), Dist())
    assert {"model.patch.weight", "model.log_scale", "obj.decoder.embed.weight"} <= set(grad)
    for rank_result in run_gloo(_worker, W, *_setup()):
        dist_losses, dist_grads, dist_state = rank_result
        assert dist_losses == pytest.approx(losses, abs=1e-9)
        assert set(dist_grads) == set(grad)
        for name, g in grad.items():
            torch.testing.assert_close(dist_grads[name], g, atol=1e-9, rtol=0, msg=name)
        for name in ("loss_buffer", "buffer_count", "step", "concept_embeds", "concept_at"):
            torch.testing.assert_close(dist_state[name], state[name], msg=name)


def test_the_gmm_weights_both_ways_in_the_gloo_setup() -> None:
    """The fixed GMM of the gloo test marks some rows noisy and some clean (so both weighted
    terms are exercised there)."""
    model_state, obj_state, batches = _setup()
    model = TinyModel().eval()
    model.load_state_dict(model_state)
    obj = objective(model)
    obj.load_state_dict(obj_state)
    set_gmm(obj, [1.9, 2.3], [0.02, 0.02], [0.6, 0.4])
    batch = {**batches[0], **obj.prepare(batches[0])}
    metrics = obj(batch, model(batch, obj.needs), Dist()).metrics
    assert 0 < metrics["noisy_rows"] < N and metrics["aux_loss"] > 0
