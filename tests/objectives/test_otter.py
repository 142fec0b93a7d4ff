"""OtterLoss: Sinkhorn-Knopp's marginals, the loss against a plain float64 reference written from
the paper's equations (loss and gradients), 1 process vs 2 gloo processes with the teacher's
embeddings given, and the EMA teacher on a real model built by ``build_state`` (setup, the
update formula, no gradient, not in the optimiser, state-dict round trip).

    pytest tests/objectives/test_otter.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import vlmray.objectives.contrastive.otter  # noqa: F401  (registers "otter")
from tests.distributed._spawn import run_gloo
from tests.objectives.test_clip import TinyClip
from tests.train.test_recipe_smoke import make_batch, small_config
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import ObjectiveMix, build_objective, validate_spec
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.otter import OtterLoss, sinkhorn
from vlmray.train.loop import train_step
from vlmray.train.state import TrainState, build_state, setup_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, W, D = 8, 2, 4
CONFIGS = [
    {},
    {"alpha": 0.3, "sinkhorn_temperature": 0.05, "sinkhorn_iterations": 3},
    {"remove_diagonal": False, "image_image_weight": 0.5, "text_text_weight": 0.0},
]


# --- a plain reference, straight from the equations -------------------------------------------


def reference_sinkhorn(sim: Tensor, lam: float, iterations: int, remove_diagonal: bool) -> Tensor:
    """Exp-domain Sinkhorn-Knopp with uniform marginals: K = exp(S / lambda) (0 on the diagonal
    if removed), then alternately rows to 1/n and columns to 1/m."""
    n, m = sim.shape
    plan = torch.exp(sim / lam)
    if remove_diagonal:
        plan = plan * (1 - torch.eye(n, m, dtype=sim.dtype))
    plan = plan / plan.sum()
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True) / n
        plan = plan / plan.sum(dim=0, keepdim=True) / m
    return plan


def reference_otter_loss(image: Tensor, text: Tensor, scale: Tensor, t_image: Tensor,
                         t_text: Tensor, **params: Any) -> Tensor:
    """L = 1/2 sum_dir -1/N sum_ij Y_ij log softmax_j(s a_i . b_j),
    Y = alpha I + (1 - alpha) M* / rowsum(M*), M* from S = cross + w_vv VV + w_tt TT."""
    cfg = OtterLoss.Config(**params)
    n = image.shape[0]
    within = (cfg.image_image_weight * t_image @ t_image.T
              + cfg.text_text_weight * t_text @ t_text.T)
    total = image.new_zeros(())
    for a, b, cross in ((image, text, t_image @ t_text.T), (text, image, t_text @ t_image.T)):
        plan = reference_sinkhorn(within + cross, cfg.sinkhorn_temperature,
                                  cfg.sinkhorn_iterations, cfg.remove_diagonal)
        target = cfg.alpha * torch.eye(n, dtype=a.dtype) + (1 - cfg.alpha) * plan / plan.sum(
            dim=1, keepdim=True)
        for i in range(n):
            logits = torch.stack([scale * a[i] @ b[j] for j in range(n)])
            total = total - (target[i] * torch.log_softmax(logits, dim=0)).sum() / (2 * n)
    return total


def _unit(seed: int, n: int = N, requires_grad: bool = False) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    return image.requires_grad_(requires_grad), text.requires_grad_(requires_grad)


# --- Sinkhorn ----------------------------------------------------------------------------------


def test_sinkhorn_is_doubly_stochastic_with_uniform_marginals() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g, dtype=torch.float64)
    log_kernel = (sim / 0.5).fill_diagonal_(float("-inf"))
    plan = sinkhorn(log_kernel, 500)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((6,), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((6,), 1 / 6, dtype=torch.float64))
    assert plan.diagonal().abs().max() == 0 and (plan >= 0).all()
    rect = sinkhorn(torch.randn(5, 7, generator=g, dtype=torch.float64), 500)
    torch.testing.assert_close(rect.sum(dim=1), torch.full((5,), 1 / 5, dtype=torch.float64))
    torch.testing.assert_close(rect.sum(dim=0), torch.full((7,), 1 / 7, dtype=torch.float64))


def test_sinkhorn_matches_exp_domain_and_survives_small_temperature() -> None:
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 5, generator=g, dtype=torch.float64)
    for diag in (False, True):
        log_kernel = sim / 0.2
        if diag:
            log_kernel = log_kernel.clone().fill_diagonal_(float("-inf"))
        torch.testing.assert_close(sinkhorn(log_kernel, 5), reference_sinkhorn(sim, 0.2, 5, diag))
    # float32, lambda = 0.005: exp(S / lambda) overflows, the log domain does not
    plan = sinkhorn(sim.float() / 0.005, 50)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=0), torch.full((5,), 0.2), rtol=0, atol=1e-5)


def test_targets_rows_sum_to_one_and_skip_true_pairs() -> None:
    t_image, t_text = _unit(2)
    target_img, target_txt = OtterLoss().targets(t_image, t_text)
    for target in (target_img, target_txt):
        torch.testing.assert_close(target.sum(dim=1), torch.ones(N, dtype=torch.float64))
        assert target.diagonal().abs().max() == 0


# --- the loss against the reference ------------------------------------------------------------


@pytest.mark.parametrize("params", CONFIGS)
def test_loss_and_grads_match_reference(params: dict[str, Any]) -> None:
    image, text = _unit(3, requires_grad=True)
    t_image, t_text = _unit(4)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    got = OtterLoss(OtterLoss.Config(**params)).loss(image, text, scale, t_image, t_text, Dist())
    want = reference_otter_loss(image, text, scale, t_image, t_text, **params)
    torch.testing.assert_close(got.loss, want)
    for a, b in zip(torch.autograd.grad(got.loss, (image, text, scale)),
                    torch.autograd.grad(want, (image, text, scale))):
        torch.testing.assert_close(a, b)
    assert set(got.metrics) == {"acc_i2t", "acc_t2i", "loss_hard", "loss_soft", "target_entropy"}


def test_alpha_one_is_clip() -> None:
    image, text = _unit(5, requires_grad=True)
    t_image, t_text = _unit(6)
    scale = torch.tensor(4.0, dtype=torch.float64)
    otter = OtterLoss(OtterLoss.Config(alpha=1.0)).loss(image, text, scale, t_image, t_text,
                                                        Dist()).loss
    clip = ClipLoss()({}, Outputs(image, text, logit_scale=scale), Dist()).loss
    torch.testing.assert_close(otter, clip, rtol=0, atol=1e-12)


def test_config_is_checked() -> None:
    assert build_objective(ObjectiveSpec(name="otter", params={"alpha": 0.2})).cfg.alpha == 0.2
    for bad in ({"alpha": 1.5}, {"momentum": -0.1}, {"sinkhorn_iterations": 0},
                {"sinkhorn_temperature": 0.0}, {"text_text_weight": -1.0}):
        with pytest.raises(ValueError, match="otter: "):
            validate_spec(ObjectiveSpec(name="otter", params=bad))
    with pytest.raises(UnknownNameError, match="valid choices: 'eval', 'train'"):
        validate_spec(ObjectiveSpec(name="otter", params={"teacher_mode": "frozen"}))
    with pytest.raises(ValueError, match="no teacher"):
        image, text = _unit(7)
        OtterLoss()({}, Outputs(image, text, logit_scale=torch.tensor(1.0)), Dist())


# --- 1 process vs 2 gloo processes -------------------------------------------------------------


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Fixed student weights, a global batch of N inputs and the teacher's N embeddings."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pixels = torch.randn(N, 5, generator=g, dtype=torch.float64)
    tokens = torch.randn(N, 6, generator=g, dtype=torch.float64)
    t_image, t_text = _unit(8)
    return TinyClip().state_dict(), pixels, tokens, t_image, t_text


def _loss_and_grads(state: dict, pixels: Tensor, tokens: Tensor, t_image: Tensor,
                    t_text: Tensor, dist: Dist) -> tuple[float, dict[str, Tensor]]:
    model = TinyClip()
    model.load_state_dict(state)
    out = model(pixels, tokens)
    loss_fn = OtterLoss(OtterLoss.Config(alpha=0.4))
    loss = loss_fn.loss(out.image_embeds, out.text_embeds, out.logit_scale, t_image, t_text,
                        dist).loss
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, pixels: Tensor, tokens: Tensor,
            t_image: Tensor, t_text: Tensor) -> tuple[float, dict[str, Tensor]]:
    """Each rank: its N/W rows (student inputs and teacher embeddings), then the DDP average."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    loss, grads = _loss_and_grads(state, pixels[rows], tokens[rows], t_image[rows],
                                  t_text[rows], dist)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads


def test_two_processes_match_one() -> None:
    """Same loss and DDP-averaged gradients as one process on the full batch."""
    setup = _setup()
    loss, grads = _loss_and_grads(*setup, Dist())
    for dist_loss, dist_grads in run_gloo(_worker, W, *setup):
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)


# --- the EMA teacher on a real model -----------------------------------------------------------


def _state(**params: Any) -> TrainState:
    cfg = small_config("otter_tiny")
    cfg.objectives[0].params.update(params)
    return build_state(cfg, device=torch.device("cpu"))


def _otter(state: TrainState) -> OtterLoss:
    obj = state.mix.objectives["otter"]
    assert isinstance(obj, OtterLoss)
    return obj


def test_setup_makes_a_frozen_copy_outside_the_optimiser() -> None:
    state = _state()
    teacher = _otter(state).teacher
    assert teacher is not None and teacher is not state.core
    for (name, p_t), p_s in zip(teacher.named_parameters(), state.core.parameters()):
        assert not p_t.requires_grad and p_t.data_ptr() != p_s.data_ptr(), name
        torch.testing.assert_close(p_t, p_s, rtol=0, atol=0)
    in_optimiser = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert not in_optimiser & {id(p) for p in teacher.parameters()}
    assert in_optimiser == {id(p) for p in state.core.parameters() if p.requires_grad}
    assert any(k.startswith("objectives.otter.teacher.") for k in state.mix.state_dict())


def test_ema_update_formula() -> None:
    m = 0.9
    state = _state(momentum=m)
    obj = _otter(state)
    with torch.no_grad():
        for p in state.core.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    obj.update_teacher()
    student = dict(state.core.named_parameters())
    for name, p_t in obj.teacher.named_parameters():
        torch.testing.assert_close(p_t, m * old[name] + (1 - m) * student[name], msg=name)
    for (name, b_t), b_s in zip(obj.teacher.named_buffers(), state.core.buffers()):
        torch.testing.assert_close(b_t, b_s, rtol=0, atol=0, msg=name)


def test_forward_updates_in_training_mode_only_and_sees_the_same_batch() -> None:
    state = _state(momentum=0.0)              # m = 0: the teacher becomes the student
    obj, batch = _otter(state), make_batch(state.cfg)
    with torch.no_grad():
        for p in state.core.parameters():
            p.mul_(1.01)
    state.core.eval()                         # the teacher runs in eval mode: compare alike
    out = state.core(batch, state.mix.needs)
    obj.eval()
    obj(batch, out, Dist())                   # eval: no update
    assert not torch.equal(obj.teacher_embeds(batch)[0], out.image_embeds)
    obj.train()
    obj(batch, out, Dist())                   # train: theta_t <- theta_s
    assert obj.teacher is not None and not obj.teacher.training
    teacher_image, teacher_text = obj.teacher_embeds(batch)
    torch.testing.assert_close(teacher_image, out.image_embeds.detach())
    torch.testing.assert_close(teacher_text, out.text_embeds.detach())


def test_training_steps_give_the_teacher_no_gradient_and_move_it() -> None:
    state = _state(momentum=0.5)
    obj, batch = _otter(state), make_batch(state.cfg)
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    for _ in range(2):
        metrics = train_step(state, batch, Dist())
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert {"otter/loss_hard", "otter/loss_soft"} <= set(metrics)
    # step 1's update copies the initial student (no change); step 2's moves toward step 1's
    moved = [k for k, v in obj.teacher.named_parameters() if not torch.equal(v, before[k])]
    assert moved


def test_teacher_round_trips_through_the_mix_state_dict() -> None:
    state = _state(momentum=0.5)
    batch = make_batch(state.cfg)
    for _ in range(2):
        train_step(state, batch, Dist())
    saved = state.mix.state_dict()
    fresh = ObjectiveMix.from_specs(state.cfg.objectives)
    fresh.setup(setup_context(state.cfg, _state().core))    # a teacher at the initial weights
    teacher = _otter(state).teacher.state_dict()
    prefix = "objectives.otter.teacher."
    initial = {k[len(prefix):]: v for k, v in fresh.state_dict().items() if k.startswith(prefix)}
    assert initial.keys() == teacher.keys()
    assert any(not torch.equal(v, teacher[k]) for k, v in initial.items())
    fresh.load_state_dict(saved)
    restored = fresh.objectives["otter"].teacher.state_dict()
    assert restored.keys() == teacher.keys()
    for name, value in teacher.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=0, msg=name)
