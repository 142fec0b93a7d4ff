r"""OTTER's optimal-transport distillation (Wu, Cheng, Zhang, Gao, Vajda and Gonzalez, ICLR 2022,
"Data Efficient Language-Supervised Zero-Shot Recognition with Optimal Transport Distillation").

Web captions are noisy and image-text relations are many-to-many, so InfoNCE's one-hot target
(only the paired caption is right) is too hard. OTTER softens it with a matching found by
entropic optimal transport over a teacher's similarities (an EMA of the student). Over a global
batch of N pairs, with teacher embeddings (L2-normalised) \hat u_i, \hat v_i:

    S_img = \hat U \hat V^T + w_vv \hat U \hat U^T + w_tt \hat V \hat V^T      (N, N)
    S_txt = S_img^T  (= \hat V \hat U^T + the same symmetric within-modality terms)
    M*    = argmax_{M in U(1/N, 1/N)} <M, S> + lambda H(M)    (Sinkhorn-Knopp, uniform marginals)
    Y     = alpha I_N + (1 - alpha) M* / rowsum(M*)
    L     = 1/2 [ CE(Y_img, softmax(s U V^T)) + CE(Y_txt, softmax(s V U^T)) ]

with CE(Y, P) = -1/N sum_i sum_j Y_ij log P_ij and s the student's learnable logit scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.objectives.base import LossResult, Objective, SetupContext, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


def sinkhorn(log_kernel: Tensor, iterations: int) -> Tensor:
    r"""Sinkhorn-Knopp in the log domain: the plan P (M, N) with rows summing to 1/M and
    columns to 1/N, P = diag(a) exp(log_kernel) diag(b).

    Each iteration rescales the rows to 1/M, then the columns to 1/N (the column marginal is
    exact after every iteration; the rows converge). ``log_kernel`` = S / lambda; ``-inf``
    entries get zero mass. Same iterates as the exp-domain algorithm, without its overflow at
    small lambda.
    """
    rows, cols = log_kernel.shape
    log_plan = log_kernel
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True) - math.log(rows)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True) - math.log(cols)
    return log_plan.exp()


def _float(x: Tensor) -> Tensor:
    """At least float32 (bf16 under autocast -> float32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@register_objective("otter")
class OtterLoss(Objective):
    r"""InfoNCE mixed with soft targets from an entropic OT matching of an EMA teacher.

        L_r = 1/2 sum_{dir in (img, txt)} [ alpha CE(logits_dir, y)
                                            + (1 - alpha) CE(logits_dir, T_dir) ]

    where each CE is a mean over this rank's B rows, y = r*B + arange(B), and T_dir are this
    rank's rows of the row-normalised Sinkhorn plan M*_dir / rowsum (module docstring). The soft
    term is the cross-entropy -sum_j T_ij log p_ij of the paper's equation (the authors' code
    uses the KL divergence, which differs by the target entropy H(T): same gradients).

    Targets: the teacher embeddings of every worker are gathered (no grad), the full N x N
    teacher similarity and both Sinkhorn plans are computed on every rank (identical
    everywhere), and each rank takes its rows; so the targets do not depend on W. ``remove_
    diagonal`` (the authors' release) gives the true pairs zero OT mass: M* spreads the
    (1 - alpha) share over the other pairs, the alpha share stays on the diagonal. The
    student's logits are CLIP's gathered local B x N (``clip.py``), so the loss and its
    gradients equal the single-process ones.

    Teacher: ``setup`` deep-copies ``ctx.model`` into ``self.teacher`` (a frozen submodule: it
    moves with ``.to``, is saved in the objectives' state dict, and the optimiser skips it).
    At the start of every forward in training mode
        theta_t <- m theta_t + (1 - m) theta_s      (parameters; buffers are copied)
    so the first step's teacher equals the student (the paper's EMA; m = ``momentum``). The
    teacher sees the same batch (the same augmented views) under ``torch.no_grad``. With
    ``teacher_mode="eval"`` (default) it runs in eval mode: no dropout, and BatchNorm uses the
    running statistics copied from the student, so the targets are deterministic and the same
    for any W. ``"train"`` runs it in train mode as the authors' code does: BatchNorm
    normalises with this rank's local batch statistics (targets then depend on how the batch
    is split over workers) and dropout is active.

    Differences from the authors' code: it scales the soft term's logits by a second learnable
    temperature (here both terms share the model's s: one prediction per direction, scored
    against the mixed target Y); it sums the two directions (here averaged, so alpha = 1 is
    CLIP's loss); it warms the EMA up with m_n = min(m, (1+n)/(10+n)) (here a constant m); and
    it removes the diagonal by subtracting 100 from the image-image and text-text similarities
    (here an exact -inf mask, independent of w_vv and w_tt).
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale"})

    @dataclass(kw_only=True)
    class Config:
        alpha: float = 0.5
        """Weight of InfoNCE's hard target; 1 - alpha goes to the OT targets. In [0, 1]."""
        momentum: float = 0.999
        """EMA momentum m of the teacher, in [0, 1]; 0: teacher = current student."""
        sinkhorn_iterations: int = 5
        """Sinkhorn-Knopp iterations (the authors use 5); > 0."""
        sinkhorn_temperature: float = 0.15
        """Entropic regulariser lambda: kernel exp(S / lambda). > 0."""
        image_image_weight: float = 1.0
        """w_vv, weight of the teacher's image-image similarity in S; >= 0."""
        text_text_weight: float = 1.0
        """w_tt, weight of the teacher's text-text similarity in S; >= 0."""
        remove_diagonal: bool = True
        """Zero OT mass on the true pairs (their share is alpha's hard target)."""
        teacher_mode: Literal["eval", "train"] = "eval"
        """Module mode of the teacher's forward (dropout, BatchNorm statistics)."""

        def __post_init__(self) -> None:
            checks = [
                ("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
                ("momentum", 0.0 <= self.momentum <= 1.0, "in [0, 1]"),
                ("sinkhorn_iterations", self.sinkhorn_iterations > 0, "> 0"),
                ("sinkhorn_temperature", self.sinkhorn_temperature > 0, "> 0"),
                ("image_image_weight", self.image_image_weight >= 0, ">= 0"),
                ("text_text_weight", self.text_text_weight >= 0, ">= 0"),
            ]
            for name, ok, rule in checks:
                if not ok:
                    raise ValueError(f"otter: {name} must be {rule}, got {getattr(self, name)}")

    def __init__(self, cfg: OtterLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else OtterLoss.Config()
        self.teacher: nn.Module | None = None
        # The student, deliberately NOT a submodule (its parameters belong to the model).
        self._student: tuple[nn.Module, ...] = ()

    # --- the teacher ---------------------------------------------------------------------------

    def setup(self, ctx: SetupContext) -> None:
        """The teacher: a frozen deep copy of the (unwrapped) model, registered as a submodule."""
        self._student = (ctx.model,)
        self.teacher = copy.deepcopy(ctx.model).requires_grad_(False)

    def _models(self) -> tuple[nn.Module, nn.Module]:
        if self.teacher is None or not self._student:
            raise ValueError("objective 'otter' has no teacher: call setup(SetupContext) first "
                             "(ObjectiveMix.setup does, in vlmray.train.state.build_state)")
        return self.teacher, self._student[0]

    @torch.no_grad()
    def update_teacher(self) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s for every parameter; buffers copied."""
        teacher, student = self._models()
        weight = 1.0 - self.cfg.momentum
        pairs = zip(teacher.named_parameters(), student.named_parameters(), strict=True)
        for (name_t, p_t), (name_s, p_s) in pairs:
            if name_t != name_s:
                raise ValueError(f"otter: teacher parameter {name_t} != student's {name_s}")
            p_t.lerp_(p_s.detach().to(p_t.dtype), weight)
        for b_t, b_s in zip(teacher.buffers(), student.buffers(), strict=True):
            b_t.copy_(b_s)

    @torch.no_grad()
    def teacher_embeds(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The teacher's (image_embeds, text_embeds) of the same batch, (B, D) each, detached."""
        teacher, _ = self._models()
        teacher.train(self.cfg.teacher_mode == "train")
        out = teacher(batch, needs=())
        return out.image_embeds.detach(), out.text_embeds.detach()

    # --- the loss ------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """EMA step (training mode only), teacher forward, then ``loss``."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        logit_scale = require(out, "logit_scale", self.name)
        if self.training:
            self.update_teacher()
        teacher_image, teacher_text = self.teacher_embeds(batch)
        return self.loss(image, text, logit_scale, teacher_image, teacher_text, dist)

    def loss(self, image: Tensor, text: Tensor, logit_scale: Tensor, teacher_image: Tensor,
             teacher_text: Tensor, dist: Dist) -> LossResult:
        """L_r from this rank's student (B, D) embeddings and its teacher (B, D) embeddings."""
        if image.shape != text.shape or teacher_image.shape != teacher_text.shape:
            raise ValueError(f"otter: image {tuple(image.shape)}, text {tuple(text.shape)}, "
                             f"teacher {tuple(teacher_image.shape)}/{tuple(teacher_text.shape)}")
        all_image, all_text = dist.all_gather(torch.stack((image, text), 1)).unbind(1)  # (N, D)
        per_image = _float(logit_scale * image @ all_text.T)                # (B, N)
        per_text = _float(logit_scale * text @ all_image.T)                 # (B, N)
        labels = dist.offsets(image.shape[0], device=image.device)          # (B,)
        teacher = torch.stack((teacher_image, teacher_text), 1).detach()
        t_image, t_text = _float(dist.all_gather(teacher, with_grad=False)).unbind(1)  # (N, D)
        target_img, target_txt = self.targets(t_image, t_text)              # (N, N) each
        target_img = target_img[labels].to(per_image.dtype)                 # (B, N)
        target_txt = target_txt[labels].to(per_text.dtype)                  # (B, N)
        hard = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        soft = 0.5 * (F.cross_entropy(per_image, target_img)
                      + F.cross_entropy(per_text, target_txt))
        alpha = self.cfg.alpha
        loss = alpha * hard + (1.0 - alpha) * soft
        return LossResult(loss=loss, metrics=self.metrics(per_image, per_text, labels, hard, soft,
                                                          target_img))

    @torch.no_grad()
    def targets(self, t_image: Tensor, t_text: Tensor) -> tuple[Tensor, Tensor]:
        """Row-normalised Sinkhorn plans (image rows, text rows), (N, N) each, rows sum to 1."""
        cfg = self.cfg
        within = (cfg.image_image_weight * t_image @ t_image.T
                  + cfg.text_text_weight * t_text @ t_text.T)               # (N, N), symmetric
        cross = t_image @ t_text.T                                          # (N, N)
        plans = []
        for sim in (within + cross, within + cross.T):                      # S_img, S_txt
            log_kernel = sim / cfg.sinkhorn_temperature
            if cfg.remove_diagonal and sim.shape[0] > 1:
                eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
                log_kernel = log_kernel.masked_fill(eye, float("-inf"))
            plan = sinkhorn(log_kernel, cfg.sinkhorn_iterations)
            plans.append(plan / plan.sum(dim=1, keepdim=True))
        return plans[0], plans[1]

    @staticmethod
    @torch.no_grad()
    def metrics(per_image: Tensor, per_text: Tensor, labels: Tensor, hard: Tensor, soft: Tensor,
                target_img: Tensor) -> dict[str, Tensor]:
        """Top-1 accuracies, the two loss terms, and the OT targets' mean row entropy (nats)."""
        acc_i2t = (per_image.argmax(dim=1) == labels).double().mean()
        acc_t2i = (per_text.argmax(dim=1) == labels).double().mean()
        entropy = -torch.xlogy(target_img, target_img).sum(dim=1).mean()
        return stack_metrics(("acc_i2t", "acc_t2i", "loss_hard", "loss_soft", "target_entropy"),
                             (acc_i2t, acc_t2i, hard.detach().double(), soft.detach().double(),
                              entropy.double()))


__all__ = ["OtterLoss", "sinkhorn"]
