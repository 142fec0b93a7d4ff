r"""DeCLIP's nearest-neighbour supervision, NNS (Li et al., ICLR 2022, "Supervision Exists
Everywhere: A Data Efficient Contrastive Language-Image Pre-training Paradigm").

A web caption is one noisy description of its image; the caption of a *similar* pair is another,
free one. For each image u_i the positive is NN(v_i), the nearest neighbour of its own caption's
embedding v_i; the negatives are the other pairs' NN texts. Over a global batch of N pairs, with
the learned inverse temperature s:

    L_NNS = -1/N sum_i log( exp(s u_i.NN(v_i)) / sum_j exp(s u_i.NN(v_j)) )
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.models.outputs import NN_TEXT_EMBEDS
from vlmray.objectives.base import LossResult, Metric, Objective, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

_QUEUE_NEEDS = frozenset({"image_embeds", "text_embeds", "logit_scale"})
_INDEX_NEEDS = frozenset({"image_embeds", "logit_scale", NN_TEXT_EMBEDS})


@register_objective("declip_nns")
class DeclipNNSLoss(Objective):
    r"""L_NNS over the global batch; NN(v) from a feature queue or from an offline index.

    ``source="queue"`` (the paper): a FIFO queue Q of detached text embeddings, filled from all
    workers (so identical on every rank), gives NN(v_i) = argmax_{q in Q} v_i.q. The queue is
    searched *before* this step's texts are enqueued, so a row never finds its own caption of
    this step. While Q is empty the loss is 0 (metric ``queue_empty`` = 1).
    ``source="index"``: NN(v_i) is the online text tower's embedding of the nearest
    non-duplicate neighbour's caption found offline with FAISS (batch columns ``nn_tokens``,
    ``nn_token_mask``), read from ``Outputs.extra["nn_text_embeds"]``.

    With ``gather="local"`` rank r scores its B images against all N NN texts (logits B x N,
    labels ``r*B + arange(B)``); ``"global"`` computes the N x N logits on every rank.

    Gradients. queue: NN(v) is a detached queue row chosen by a (non-differentiable) argmax, so
    the loss is a function of the images and s only; their gradients are exact (a W-worker run
    equals one process on the same global batch and queue), and the text tower gets none from
    this loss. index: the NN captions are encoded by the online text tower and gathered with
    gradient, so the gradients to the images, s and the text tower are all exact.
    """

    needs = _QUEUE_NEEDS  # per instance: see __init__

    @dataclass(kw_only=True)
    class Config:
        source: Literal["queue", "index"] = "queue"
        """queue: NN from a FIFO of past text embeddings (paper); index: offline FAISS NN."""
        queue_size: int = 4096
        """Rows of the text-embedding queue (``source="queue"``); > 0."""
        gather: Literal["local", "global"] = "local"
        """local: B x N logits per rank; global: N x N on every rank (same loss and grads)."""

        def __post_init__(self) -> None:
            if self.queue_size <= 0:
                raise ValueError(f"declip_nns: queue_size must be > 0, got {self.queue_size}")

    def __init__(self, cfg: DeclipNNSLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else DeclipNNSLoss.Config()
        self.needs = _QUEUE_NEEDS if self.cfg.source == "queue" else _INDEX_NEEDS
        # The queue's width D is known at the first step; (0, 0) until then (see _load_...).
        self.register_buffer("queue", torch.zeros(0, 0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    # --- the loss ------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = CE(s U_r NN(V)^T, offsets), a mean over this rank's rows (all N if global)."""
        image = require(out, "image_embeds", self.name)
        logit_scale = require(out, "logit_scale", self.name)
        if self.cfg.source == "index":
            return self.index_loss(image, self.nn_embeds(out), logit_scale, dist, out.text_embeds)
        return self.queue_loss(image, require(out, "text_embeds", self.name), logit_scale, dist)

    def index_loss(self, image: Tensor, nn_text: Tensor, logit_scale: Tensor, dist: Dist,
                   text: Tensor | None = None) -> LossResult:
        """NN(V) = the gathered (with gradient) online embeddings of the NN captions.

        ``text`` (B, D), optional, only feeds the ``nn_sim`` metric (v_i . NN(v_i)).
        """
        all_nn = dist.all_gather(nn_text.to(image.dtype), with_grad=True)  # (N, D)
        logits = self.logits(image, all_nn, logit_scale, dist)
        labels = self.targets(logits, dist)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            values = [(logits.argmax(dim=1) == labels).double().mean()]
            if text is not None:
                values.append((text.double() * nn_text.double()).sum(-1).mean())
            names = ("nn_acc", "nn_sim")[: len(values)]
            metrics = stack_metrics(names, values)
        return LossResult(loss=loss, metrics=metrics)

    def queue_loss(self, image: Tensor, text: Tensor, logit_scale: Tensor,
                   dist: Dist) -> LossResult:
        """NN(V) from the queue as it was before this step; then this step's texts go in."""
        text = text.detach().float()                                        # (B, D)
        self._ensure_queue(text.shape[1], text.device)
        filled = int(self.queue_count)  # host sync (control flow): rows to search, if any
        if filled == 0:
            self.enqueue(dist.all_gather(text, with_grad=False))
            empty = (logit_scale * image).sum() * 0.0  # keeps the graph: every grad is 0
            return LossResult(loss=empty, metrics=self._queue_metrics(0.0, 0.0, empty=True))
        nn_local, nn_sim = self.nearest(text, filled)                       # (B, D), (B,)
        pairs = dist.all_gather(torch.stack((nn_local, text), dim=1), with_grad=False)
        all_nn, all_text = pairs.unbind(dim=1)                              # (N, D) each
        logits = self.logits(image, all_nn.to(image.dtype), logit_scale, dist)
        labels = self.targets(logits, dist)
        loss = F.cross_entropy(logits, labels)
        self.enqueue(all_text)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == labels).double().mean()
            nn_acc, sim = torch.stack([acc, nn_sim.double().mean()]).unbind()
        return LossResult(loss=loss, metrics=self._queue_metrics(nn_acc, sim, empty=False))

    def logits(self, image: Tensor, all_nn: Tensor, logit_scale: Tensor, dist: Dist) -> Tensor:
        """s U_r NN(V)^T (B, N); with ``gather="global"`` s U NN(V)^T (N, N)."""
        if self.cfg.gather == "global":
            image = dist.all_gather(image, with_grad=True)                  # (N, D)
        return logit_scale * image @ all_nn.T

    def targets(self, logits: Tensor, dist: Dist) -> Tensor:
        """Column of each row's positive NN(v_i): r*B + arange(B), or arange(N) if global."""
        rows = logits.shape[0]
        if self.cfg.gather == "global":
            return torch.arange(rows, dtype=torch.long, device=logits.device)
        return dist.offsets(rows, device=logits.device)

    def nn_embeds(self, out: Outputs) -> Tensor:
        """``out.extra["nn_text_embeds"]`` (B, D), or a clear error when the model skipped it."""
        if NN_TEXT_EMBEDS not in out.extra:
            raise ValueError(f"objective {self.name!r} (source='index') needs "
                             f"Outputs.extra[{NN_TEXT_EMBEDS!r}]: run the model with "
                             f"needs={sorted(self.needs)} on a batch with nn_tokens columns")
        return out.extra[NN_TEXT_EMBEDS]

    # --- the queue -----------------------------------------------------------------------------

    @torch.no_grad()
    def nearest(self, text: Tensor, count: int | None = None) -> tuple[Tensor, Tensor]:
        """(NN(v_i), v_i.NN(v_i)) over the ``count`` filled queue rows (default
        ``queue_count``, read with a host sync): (B, D), (B,)."""
        filled = self.queue[: int(self.queue_count) if count is None else count]   # (F, D)
        sim, idx = (text @ filled.T).max(dim=1)                             # (B,)
        return filled[idx], sim

    @torch.no_grad()
    def enqueue(self, texts: Tensor) -> None:
        """FIFO write of the gathered (N, D) texts at the pointer; wraps around, keeps the last
        ``queue_size`` when N exceeds it."""
        self._ensure_queue(texts.shape[1], texts.device)
        size, n = self.cfg.queue_size, texts.shape[0]
        slots = (self.queue_ptr + torch.arange(n, device=texts.device)) % size
        keep = slice(max(0, n - size), n)
        self.queue[slots[keep]] = texts[keep].detach().to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_count.copy_((self.queue_count + n).clamp(max=size))

    def _ensure_queue(self, dim: int, device: torch.device) -> None:
        if self.queue.shape != (self.cfg.queue_size, dim):
            if self.queue.numel():
                raise ValueError(f"declip_nns: the queue {tuple(self.queue.shape)} does not "
                                 f"match (queue_size, D) = ({self.cfg.queue_size}, {dim})")
            self.queue = torch.zeros(self.cfg.queue_size, dim, device=device)

    def _queue_metrics(self, nn_acc: Metric, nn_sim: Metric, *, empty: bool) -> dict[str, Metric]:
        fill = self.queue_count.double() / self.cfg.queue_size     # a copy: the count moves on
        return {"nn_acc": nn_acc, "nn_sim": nn_sim, "queue_fill": fill,
                "queue_empty": float(empty)}

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        """Take the saved queue's shape (the buffer is (0, 0) until the first step)."""
        saved = state_dict.get(prefix + "queue")
        if isinstance(saved, Tensor) and saved.shape != self.queue.shape:
            self.queue = torch.zeros_like(saved, device=self.queue.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["DeclipNNSLoss"]
