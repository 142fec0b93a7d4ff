r"""NLIP's noise harmonisation (Huang, Long, Han, Xu, Liang, Xu and Liang, AAAI 2023, "NLIP:
Noise-robust Language-Image Pre-training").

Memorisation effect: a network fits clean image-text pairs before it fits mismatched ones, so
early in training the per-pair contrastive loss is bimodal: low for clean pairs, high for noisy
ones. NLIP fits a two-component Gaussian mixture to the per-pair losses and reads each pair's
noise probability as the posterior of the high-mean component; the contrastive alignment of
likely-noisy pairs is then relaxed in proportion (noise-adaptive regularisation).

NLIP's second scheme, noise *completion* (a concept-conditioned caption decoder whose synthetic
captions replace incomplete ones), is a separate, later piece of work and is not built here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

_LOG_2PI = math.log(2.0 * math.pi)


# --- the two-component 1-D Gaussian mixture ------------------------------------------------


def gmm_log_joint(x: Tensor, means: Tensor, variances: Tensor, weights: Tensor) -> Tensor:
    """log( pi_k N(x_m | mu_k, sigma_k^2) ), (M, 2) for x (M,) and (2,) parameters."""
    diff = x[:, None] - means[None, :]                                       # (M, 2)
    return (weights.log() - 0.5 * (_LOG_2PI + variances.log()))[None, :] - diff**2 / (2 * variances)


def gmm_responsibilities(x: Tensor, means: Tensor, variances: Tensor, weights: Tensor) -> Tensor:
    """Posterior p(k | x_m) of each component, (M, 2); rows sum to 1."""
    return gmm_log_joint(x, means, variances, weights).softmax(dim=1)


@torch.no_grad()
def fit_gmm_1d(x: Tensor, iters: int = 20, rel_var_floor: float = 1e-4
               ) -> tuple[Tensor, Tensor, Tensor]:
    """EM for a two-component Gaussian mixture on the samples x (M,), M >= 2, in float64.

    Deterministic init from the median split: component 0 starts at the mean and variance of
    the samples below the median, component 1 at those above it; weights 1/2 each. Every
    variance is floored at ``rel_var_floor * var(x) + 1e-12`` so a component cannot collapse
    onto one sample. Returns (means, variances, weights), each float64 (2,), means ascending.
    """
    x = x.detach().double().flatten()
    if x.numel() < 2:
        raise ValueError(f"fit_gmm_1d needs at least 2 samples, got {x.numel()}")
    floor = rel_var_floor * x.var(unbiased=False) + 1e-12
    lower, upper = x.sort().values.tensor_split(2)                           # median split
    means = torch.stack([lower.mean(), upper.mean()])
    variances = torch.stack([lower.var(unbiased=False), upper.var(unbiased=False)]) + floor
    weights = torch.full((2,), 0.5, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        resp = gmm_responsibilities(x, means, variances, weights)           # E-step, (M, 2)
        mass = resp.sum(dim=0).clamp_min(1e-12)                              # (2,)
        weights = mass / x.numel()                                           # M-step
        means = (resp * x[:, None]).sum(dim=0) / mass
        variances = (resp * (x[:, None] - means) ** 2).sum(dim=0) / mass + floor
        weights = weights.clamp_min(1e-12) / weights.clamp_min(1e-12).sum()
    order = means.argsort()
    return means[order], variances[order], weights[order]


def noise_posterior(x: Tensor, means: Tensor, variances: Tensor, weights: Tensor) -> Tensor:
    """p(noisy | x) = posterior of the high-mean component, float64 (M,), non-decreasing in x.

    x is clamped to [mu_clean, mu_noisy] first: between the two means the posterior rises
    monotonically (both log-density slopes favour the noisy side), while outside them a
    wider clean component could win the far tail back (a loss above every noisy pair's would
    look clean). Clamping keeps "higher loss, at least as noisy".
    """
    lo, hi = means.min(), means.max()
    x = torch.minimum(torch.maximum(x.detach().double(), lo), hi)
    noisy = means.argmax().reshape(1)                   # a tensor index: no host sync
    return gmm_responsibilities(x, means, variances, weights).index_select(1, noisy).squeeze(1)


# --- the objective -------------------------------------------------------------------------


@register_objective("nlip")
class NlipLoss(Objective):
    r"""CLIP's InfoNCE with NLIP's noise harmonisation: per-pair noise probabilities from a
    two-component GMM on the per-pair losses, and softened targets for likely-noisy pairs.

    Per-pair loss of the global batch of N pairs (s = exp(t), logits z_ij = s u_i.v_j):

        l_i = 1/2 [ -log softmax_j(z_i.)_i  -  log softmax_j(z_.i)_i ]        (detached)

    Noise probability. A GMM {pi_k, mu_k, sigma_k^2}, k in {clean, noisy}, mu_clean < mu_noisy,
    fitted by EM to the last ``buffer_size`` per-pair losses (all workers' rows, so every rank
    fits the same mixture), refitted every ``refit_every`` steps from ``start_step`` on:

        p_i = pi_noisy N(l_i | mu_noisy, sigma_noisy^2) / sum_k pi_k N(l_i | mu_k, sigma_k^2)

    Noise-adaptive regularisation: the one-hot target of pair i is softened towards the
    uniform distribution over the N candidates by eps_i = ``strength`` * p_i, both ways:

        q_i = (1 - eps_i) e_i + eps_i / N,   L = 1/(2N) sum_i [ H(q_i, softmax(z_i.))
                                                              + H(q_i, softmax(z_.i)) ]

    so a clean pair (p_i ~ 0) keeps CLIP's alignment and a noisy one (p_i ~ 1) is pulled
    towards its own caption no more than towards any other. Before ``start_step`` (the
    warm-up in which the memorisation effect shows) p_i = 0 and L is CLIP's loss exactly.

    Deviations, stated plainly: the paper describes the regulariser in words (harmonise the
    alignment of each pair by its noise probability); we could not check its exact formula,
    so the form above (per-pair label smoothing by p_i) is our reading. The paper refits the
    GMM on losses of the whole data set once per epoch; we refit on a FIFO of the most recent
    training-step losses (no extra pass over the data). Posteriors are computed on losses
    clamped to [mu_clean, mu_noisy] so they never decrease with the loss (``noise_posterior``).

    Distribution: ``gather="local"`` scores this rank's B rows against all N columns (ClipLoss's
    logits and targets) and averages over them; each row's term depends only on its own row and
    p_i, and every rank holds the same GMM, so (1/W) sum_r L_r = L with exact gradients.
    The GMM state (loss buffer, fitted parameters, step counter) lives in buffers and is saved
    with checkpoints; it changes only in training mode.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale"})

    @dataclass(kw_only=True)
    class Config:
        gather: Literal["local", "global"] = "local"
        """local: B x N logits per rank, exact grads; global: N x N on every rank."""
        start_step: int = 1000
        """Training steps of plain CLIP before the first GMM fit (the warm-up); >= 0."""
        refit_every: int = 100
        """Refit the GMM every this many steps from ``start_step`` on; > 0."""
        buffer_size: int = 8192
        """Most recent per-pair losses (all ranks' rows) the GMM is fitted to; >= 2."""
        strength: float = 1.0
        """eps_i = strength * p_i, how far a noisy pair's target moves to uniform; [0, 1]."""
        em_iters: int = 20
        """EM iterations per fit; > 0."""

        def __post_init__(self) -> None:
            checks = [(self.start_step >= 0, "start_step must be >= 0"),
                      (self.refit_every > 0, "refit_every must be > 0"),
                      (self.buffer_size >= 2, "buffer_size must be >= 2"),
                      (0.0 <= self.strength <= 1.0, "strength must be in [0, 1]"),
                      (self.em_iters > 0, "em_iters must be > 0")]
            for ok, message in checks:
                if not ok:
                    raise ValueError(f"nlip: {message}, got {self}")

    def __init__(self, cfg: NlipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else NlipLoss.Config()
        self.clip = ClipLoss(ClipLoss.Config(gather=self.cfg.gather))  # logits/targets only
        f64 = torch.float64
        self.register_buffer("loss_buffer", torch.zeros(self.cfg.buffer_size, dtype=f64))
        self.register_buffer("buffer_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("buffer_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("gmm_means", torch.zeros(2, dtype=f64))
        self.register_buffer("gmm_vars", torch.ones(2, dtype=f64))
        self.register_buffer("gmm_weights", torch.full((2,), 0.5, dtype=f64))

    # --- the loss ------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r over this rank's rows (all N if global); updates the GMM state when training."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        logit_scale = require(out, "logit_scale", self.name)
        per_image, per_text = self.clip.logits(image, text, logit_scale, dist)  # (B, N) each
        labels = self.clip.targets(per_image, dist)                             # (B,)
        pair_loss = self.pair_losses(per_image, per_text, labels)               # (B,) detached
        active = self.observe(pair_loss, dist) if self.training else self.is_active()
        if active:
            p_noise = self.noise_probability(pair_loss)                          # (B,) float64
            loss = self.harmonised_loss(per_image, per_text, labels, p_noise)
        else:
            p_noise = torch.zeros_like(pair_loss, dtype=torch.float64)
            loss = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        return LossResult(loss=loss, metrics=self.metrics(per_image, per_text, labels,
                                                          logit_scale, p_noise))

    @staticmethod
    @torch.no_grad()
    def pair_losses(per_image: Tensor, per_text: Tensor, labels: Tensor) -> Tensor:
        """l_i = (CE(z_i., y_i) + CE(z_.i, y_i)) / 2 per row, detached, (B,)."""
        i2t = F.cross_entropy(per_image, labels, reduction="none")
        t2i = F.cross_entropy(per_text, labels, reduction="none")
        return 0.5 * (i2t + t2i)

    def harmonised_loss(self, per_image: Tensor, per_text: Tensor, labels: Tensor,
                        p_noise: Tensor) -> Tensor:
        """1/2 [mean_i H(q_i, softmax(z_i.)) + mean_i H(q_i, softmax(z_.i))], q_i as above.

        p_noise: (B,) noise probabilities of this rank's rows (treated as constants).
        """
        eps64 = self.cfg.strength * p_noise.detach()                            # (B,)

        def soft_ce(logits: Tensor) -> Tensor:                                  # (B, N) -> ()
            wide = torch.promote_types(logits.dtype, torch.float32)            # bf16 -> fp32
            logp = logits.to(wide).log_softmax(dim=1)
            eps = eps64.to(wide)
            positive = logp.gather(1, labels[:, None]).squeeze(1)              # (B,)
            return -((1 - eps) * positive + eps * logp.mean(dim=1)).mean()

        return 0.5 * (soft_ce(per_image) + soft_ce(per_text))

    # --- the noise model -----------------------------------------------------------------------

    def is_active(self) -> bool:
        """Whether noise harmonisation applies: past ``start_step`` with a fitted GMM."""
        return bool(self.fitted) and int(self.step) >= self.cfg.start_step  # host sync: a branch

    @torch.no_grad()
    def observe(self, pair_loss: Tensor, dist: Dist) -> bool:
        """One training step: enqueue all ranks' per-pair losses, refit when due, count the step.

        Returns whether this step's loss is harmonised (``is_active`` after any refit).
        """
        if self.cfg.gather == "global":
            gathered = pair_loss                                                # (N,) already
        else:
            gathered = dist.all_gather(pair_loss.detach().contiguous(), with_grad=False)
        self.enqueue(gathered)
        # one host sync (control flow): whether to refit, and whether this step is harmonised
        step, count, fitted = torch.stack((self.step, self.buffer_count,
                                           self.fitted.long())).tolist()
        since = step - self.cfg.start_step
        if since >= 0 and since % self.cfg.refit_every == 0 and count >= 2:
            self.refit(count)
            fitted = True
        self.step += 1
        return bool(fitted) and since >= 0

    @torch.no_grad()
    def enqueue(self, losses: Tensor) -> None:
        """FIFO write of the gathered (N,) losses; keeps the last ``buffer_size``."""
        size, n = self.cfg.buffer_size, losses.shape[0]
        keep = slice(max(0, n - size), n)
        slots = (self.buffer_ptr + torch.arange(n, device=losses.device)) % size   # (N,)
        self.loss_buffer[slots[keep]] = losses[keep].to(self.loss_buffer)
        self.buffer_ptr.copy_((self.buffer_ptr + n) % size)
        self.buffer_count.copy_((self.buffer_count + n).clamp(max=size))

    @torch.no_grad()
    def refit(self, count: int | None = None) -> None:
        """Fit the GMM to the filled part of the loss buffer (same data on every rank): its
        ``count`` first entries (default ``buffer_count``, read with a host sync)."""
        filled = self.loss_buffer[: int(self.buffer_count) if count is None else count]
        means, variances, weights = fit_gmm_1d(filled, iters=self.cfg.em_iters)
        self.gmm_means.copy_(means)
        self.gmm_vars.copy_(variances)
        self.gmm_weights.copy_(weights)
        self.fitted.fill_(True)

    @torch.no_grad()
    def noise_probability(self, pair_loss: Tensor) -> Tensor:
        """p_i = posterior of the high-mean component for losses (M,) -> float64 (M,)."""
        return noise_posterior(pair_loss, self.gmm_means, self.gmm_vars, self.gmm_weights)

    @torch.no_grad()
    def metrics(self, per_image: Tensor, per_text: Tensor, labels: Tensor,
                logit_scale: Tensor, p_noise: Tensor) -> dict[str, Tensor]:
        """CLIP's in-batch accuracies and scale, the mean p_noise of this rank's rows, and the
        fitted GMM (clean/noisy means, noisy weight)."""
        acc_i2t = (per_image.argmax(dim=1) == labels).double().mean()
        acc_t2i = (per_text.argmax(dim=1) == labels).double().mean()
        names = ("acc_i2t", "acc_t2i", "logit_scale", "p_noise", "gmm_mean_clean",
                 "gmm_mean_noisy", "gmm_weight_noisy")
        return stack_metrics(names, (acc_i2t, acc_t2i, logit_scale.detach().double().reshape(()),
                                     p_noise.double().mean(), self.gmm_means[0],
                                     self.gmm_means[1], self.gmm_weights[1]))


__all__ = ["NlipLoss", "fit_gmm_1d", "noise_posterior"]
