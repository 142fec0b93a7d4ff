"""NLIP's noise harmonisation: the GMM, the loss against a plain reference, CLIP before the
warm-up ends, the state, 1 vs 2 gloo processes, and noise detection on mismatched pairs.

    pytest tests/objectives/test_nlip.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, validate_spec
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.nlip import NlipLoss, fit_gmm_1d, noise_posterior

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, W, D = 8, 2, 4
STATE = ("loss_buffer", "buffer_ptr", "buffer_count", "step", "fitted", "gmm_means",
         "gmm_vars", "gmm_weights")


def unit(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def nlip(**params: Any) -> NlipLoss:
    return build_objective(ObjectiveSpec(name="nlip", params=params))


def outputs(image: Tensor, text: Tensor, scale: Tensor) -> Outputs:
    return Outputs(image_embeds=image, text_embeds=text, logit_scale=scale)


def reference_posterior(loss: float, means: list[float], variances: list[float],
                        weights: list[float]) -> float:
    """pi_n N(l | mu_n, s_n^2) / sum_k pi_k N(l | mu_k, s_k^2), l clamped to [mu_c, mu_n]."""
    loss = min(max(loss, means[0]), means[1])
    dens = [w * math.exp(-(loss - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
            for m, v, w in zip(means, variances, weights)]
    return dens[1] / (dens[0] + dens[1])


def reference_loss(image: Tensor, text: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
    """1/(2N) sum_i [H(q_i, softmax(z_i.)) + H(q_i, softmax(z_.i))],
    q_i = (1 - eps_i) e_i + eps_i / N."""
    n = image.shape[0]
    logits = scale * image @ text.T                                   # (N, N)
    total = image.new_zeros(())
    for z in (logits, logits.T):
        for i in range(n):
            q = torch.full((n,), float(eps[i]) / n, dtype=image.dtype)
            q[i] += 1 - float(eps[i])
            total = total - (q * (z[i] - z[i].logsumexp(0))).sum()
    return total / (2 * n)


def grads(loss: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# --- the Gaussian mixture ------------------------------------------------------------------


def test_em_recovers_two_separated_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    clean = 1.0 + 0.3 * torch.randn(2800, generator=g, dtype=torch.float64)
    noisy = 4.0 + 0.5 * torch.randn(1200, generator=g, dtype=torch.float64)
    x = torch.cat([noisy, clean])[torch.randperm(4000, generator=g)]
    means, variances, weights = fit_gmm_1d(x, iters=50)
    torch.testing.assert_close(means, torch.tensor([1.0, 4.0], dtype=torch.float64), atol=0.05,
                               rtol=0)
    torch.testing.assert_close(variances.sqrt(), torch.tensor([0.3, 0.5], dtype=torch.float64),
                               atol=0.03, rtol=0)
    torch.testing.assert_close(weights, torch.tensor([0.7, 0.3], dtype=torch.float64),
                               atol=0.02, rtol=0)
    assert torch.equal(fit_gmm_1d(x, iters=50)[0], means)             # deterministic


def test_posteriors_are_ordered_by_loss() -> None:
    """Non-decreasing in the loss everywhere, ~0 far below and high at the noisy mean,
    even with a wide clean component (whose far tail would otherwise win back)."""
    means = torch.tensor([1.0, 3.0], dtype=torch.float64)
    variances = torch.tensor([4.0, 0.1], dtype=torch.float64)        # wide clean component
    weights = torch.tensor([0.6, 0.4], dtype=torch.float64)
    x = torch.linspace(-10.0, 30.0, 2001, dtype=torch.float64)
    p = noise_posterior(x, means, variances, weights)
    assert (p.diff() >= 0).all()
    assert p[0] < 0.05 and p[-1] > 0.85
    for loss in (-3.0, 1.0, 2.0, 2.7, 3.0, 25.0):
        want = reference_posterior(loss, means.tolist(), variances.tolist(), weights.tolist())
        got = noise_posterior(torch.tensor([loss], dtype=torch.float64), means, variances, weights)
        assert got.item() == pytest.approx(want, rel=1e-9)
    fitted = fit_gmm_1d(torch.cat([torch.randn(300, dtype=torch.float64),
                                   5 + torch.randn(100, dtype=torch.float64)]))
    assert (noise_posterior(x, *fitted).diff() >= 0).all()


# --- the loss against a plain reference ----------------------------------------------------


@pytest.mark.parametrize("gather", ["local", "global"])
def test_harmonised_loss_matches_reference(gather: str) -> None:
    """Given p_noise: loss and gradients (image, text, scale) equal the written-out equation."""
    loss_fn = nlip(gather=gather, strength=0.8)
    image, text = unit(N, D, seed=1).requires_grad_(), unit(N, D, seed=2).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    p = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    per_image, per_text = loss_fn.clip.logits(image, text, scale, Dist())
    labels = loss_fn.clip.targets(per_image, Dist())
    got = loss_fn.harmonised_loss(per_image, per_text, labels, p)
    want = reference_loss(image, text, scale, 0.8 * p)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, (image, text, scale)), grads(want, (image, text, scale))):
        torch.testing.assert_close(a, b)


def test_forward_uses_the_fitted_gmm_posterior() -> None:
    """A set GMM (eval mode: no state change): p_i from the reference posterior of l_i."""
    loss_fn = nlip(start_step=0).eval()
    means, variances, weights = [0.5, 3.0], [0.3, 0.6], [0.6, 0.4]
    for name, value in zip(("gmm_means", "gmm_vars", "gmm_weights"), (means, variances, weights)):
        getattr(loss_fn, name).copy_(torch.tensor(value, dtype=torch.float64))
    loss_fn.fitted.fill_(True)
    image, text = unit(N, D, seed=3).requires_grad_(), unit(N, D, seed=4).requires_grad_()
    text_swapped = torch.cat([text[:5], text[5:].flip(0)])           # rows 5..7 mismatched
    scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    result = loss_fn({}, outputs(image, text_swapped, scale), Dist())
    logits = scale.detach() * image.detach() @ text_swapped.detach().T
    pair = 0.5 * (F.cross_entropy(logits, torch.arange(N), reduction="none")
                  + F.cross_entropy(logits.T, torch.arange(N), reduction="none"))
    p = torch.tensor([reference_posterior(v, means, variances, weights) for v in pair.tolist()],
                     dtype=torch.float64)
    want = reference_loss(image, text_swapped, scale, p)
    torch.testing.assert_close(result.loss, want)
    for a, b in zip(grads(result.loss, (image, scale)), grads(want, (image, scale))):
        torch.testing.assert_close(a, b)
    assert result.metrics["p_noise"] == pytest.approx(p.mean().item(), rel=1e-9)
    assert result.metrics["gmm_mean_clean"] == 0.5 and result.metrics["gmm_mean_noisy"] == 3.0
    assert int(loss_fn.step) == 0 and int(loss_fn.buffer_count) == 0   # eval: state unchanged


def test_before_start_step_it_is_clip_exactly() -> None:
    loss_fn, clip = nlip(start_step=3, refit_every=2, buffer_size=20), ClipLoss()
    for step in range(3):
        image, text = unit(N, D, seed=10 + step).requires_grad_(), unit(N, D, seed=20 + step)
        scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        got = loss_fn({}, outputs(image, text, scale), Dist())
        want = clip({}, outputs(image, text, scale), Dist())
        assert torch.equal(got.loss, want.loss)
        for a, b in zip(grads(got.loss, (image, scale)), grads(want.loss, (image, scale))):
            assert torch.equal(a, b)
        assert got.metrics["p_noise"] == 0.0 and not bool(loss_fn.fitted)
    assert int(loss_fn.buffer_count) == 20 and int(loss_fn.step) == 3   # buffer fills meanwhile


def test_refit_schedule_buffer_and_checkpoint() -> None:
    """Refits at start_step and every refit_every steps on the last buffer_size losses; the
    state round-trips through the state dict."""
    loss_fn = nlip(start_step=2, refit_every=3, buffer_size=12)
    seen: list[Tensor] = []
    fits = []
    for step in range(7):
        image, text, scale = unit(N, D, seed=step), unit(N, D, seed=50 + step), torch.tensor(6.0)
        before = loss_fn.gmm_means.clone()
        loss_fn({}, outputs(image, text, scale), Dist())
        logits = scale * image @ text.T
        seen.append(0.5 * (F.cross_entropy(logits, torch.arange(N), reduction="none")
                           + F.cross_entropy(logits.T, torch.arange(N), reduction="none")))
        if not torch.equal(before, loss_fn.gmm_means):
            fits.append(step)
            want = fit_gmm_1d(torch.cat(seen)[-12:], iters=20)[0]
            torch.testing.assert_close(loss_fn.gmm_means.sort().values, want)
    assert fits == [2, 5]
    recent = torch.cat(seen)[-12:]
    torch.testing.assert_close(loss_fn.loss_buffer.sort().values, recent.sort().values)
    other = nlip(start_step=2, refit_every=3, buffer_size=12)
    other.load_state_dict(loss_fn.state_dict())
    for name in STATE:
        assert torch.equal(getattr(other, name), getattr(loss_fn, name)), name


def test_registry_and_param_validation() -> None:
    assert isinstance(build_objective(ObjectiveSpec(name="nlip")), NlipLoss)
    with pytest.raises(UnknownNameError, match="'local', 'global'"):
        validate_spec(ObjectiveSpec(name="nlip", params={"gather": "local_nograd"}))
    for bad in ({"start_step": -1}, {"refit_every": 0}, {"buffer_size": 1},
                {"strength": 1.5}, {"em_iters": 0}):
        with pytest.raises(ValueError, match="nlip: " + next(iter(bad))):
            validate_spec(ObjectiveSpec(name="nlip", params=bad))
    with pytest.raises(ValueError, match="expects int"):
        validate_spec(ObjectiveSpec(name="nlip", params={"refit_every": 2.5}))


# --- 1 process vs 2 gloo processes ---------------------------------------------------------


class Tiny(nn.Module):
    """Linear image and text encoders and a learned log-scale, float64."""

    def __init__(self, image_in: int = 5, text_in: int = 6, dim: int = D) -> None:
        super().__init__()
        self.image = nn.Linear(image_in, dim, dtype=torch.float64)
        self.text = nn.Linear(text_in, dim, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor) -> Outputs:
        return outputs(F.normalize(self.image(pixels), dim=-1),
                       F.normalize(self.text(tokens), dim=-1), self.log_scale.exp())


STEPS = 4
MODES = [{"gather": g, "start_step": 1, "refit_every": 2, "buffer_size": 12, "strength": 0.7}
         for g in ("local", "global")]


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Weights and STEPS global batches: pixels (STEPS, N, 5), tokens (STEPS, N, 6)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pixels = torch.randn(STEPS, N, 5, generator=g, dtype=torch.float64)
    tokens = torch.randn(STEPS, N, 6, generator=g, dtype=torch.float64)
    return Tiny().state_dict(), pixels, tokens


def _steps(state: dict, pixels: Tensor, tokens: Tensor, params: dict, dist: Dist
           ) -> tuple[list[float], dict[str, Tensor], dict[str, Tensor]]:
    """STEPS steps of one fixed model (refits at steps 1 and 3); every step's loss, the
    DDP-averaged grads of the last step, and the objective's state."""
    model, loss_fn = Tiny(), nlip(**params)
    model.load_state_dict(state)
    losses = []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        result = loss_fn({}, model(pixels[step], tokens[step]), dist)
        result.loss.backward()
        losses.append(dist.all_reduce_mean(result.loss).item())
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    if dist.world_size > 1:
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= dist.world_size
    return losses, grads, {k: v.clone() for k, v in loss_fn.state_dict().items()}


def _worker(rank: int, world_size: int, state: dict, *data: Tensor) -> list[Any]:
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    return [_steps(state, *(x[:, rows] for x in data), params, Dist.current())
            for params in MODES]


@pytest.fixture(scope="module")
def two_process() -> list[list[Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("i", range(len(MODES)), ids=[m["gather"] for m in MODES])
def test_two_processes_match_one(two_process: list[list[Any]], i: int) -> None:
    """Same losses and (DDP-averaged) gradients as one process on the full batch, and the GMM
    state after two refits is identical on both ranks and equal to the single-process one."""
    losses, grads, state = _steps(*_setup(), MODES[i], Dist())
    assert bool(state["fitted"]) and int(state["step"]) == STEPS
    assert grads["image.weight"].abs().max() > 0
    for rank_result in two_process:
        dist_losses, dist_grads, dist_state = rank_result[i]
        assert dist_losses == pytest.approx(losses, abs=1e-9)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-9, rtol=0, msg=name)
        for name in STATE:
            torch.testing.assert_close(dist_state[name], state[name], msg=name)
    for name in STATE:
        assert torch.equal(two_process[0][i][2][name], two_process[1][i][2][name]), name


# --- noise detection while training --------------------------------------------------------


def test_mismatched_pairs_get_higher_noise_probability() -> None:
    """40% of 512 synthetic pairs carry another sample's caption; after 40 steps of a tiny
    linear dual encoder (plain CLIP for 12, then NLIP), their mean p_noise is well above the
    matched pairs' (the memorisation effect: the model fits the consistent pairs first)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows, latent, width = 512, 8, 16
    z = torch.randn(rows, latent, generator=g, dtype=torch.float64)
    to_image, to_text = (torch.randn(latent, width, generator=g, dtype=torch.float64)
                         for _ in range(2))
    pixels = z @ to_image + 0.1 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    noisy = torch.randperm(rows, generator=g)[: int(0.4 * rows)]
    z_text = z.clone()
    z_text[noisy] = torch.randn(len(noisy), latent, generator=g, dtype=torch.float64)
    tokens = z_text @ to_text + 0.1 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    is_noisy = torch.zeros(rows, dtype=torch.bool)
    is_noisy[noisy] = True

    model = Tiny(width, width, latent)
    loss_fn = nlip(start_step=12, refit_every=4, buffer_size=512)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(40):
        idx = torch.randperm(rows, generator=g)[:128]
        opt.zero_grad()
        loss_fn({}, model(pixels[idx], tokens[idx]), Dist()).loss.backward()
        opt.step()
    assert bool(loss_fn.fitted)
    loss_fn.eval()
    with torch.no_grad():
        p = torch.empty(rows, dtype=torch.float64)
        for chunk in torch.arange(rows).split(128):
            out = model(pixels[chunk], tokens[chunk])
            per_image, per_text = loss_fn.clip.logits(out.image_embeds, out.text_embeds,
                                                      out.logit_scale, Dist())
            labels = loss_fn.clip.targets(per_image, Dist())
            p[chunk] = loss_fn.noise_probability(loss_fn.pair_losses(per_image, per_text, labels))
    print(f"mean p_noise: mismatched {p[is_noisy].mean():.3f}, matched {p[~is_noisy].mean():.3f}")
    assert p[is_noisy].mean() > p[~is_noisy].mean() + 0.4, (p[is_noisy].mean(),
                                                            p[~is_noisy].mean())
