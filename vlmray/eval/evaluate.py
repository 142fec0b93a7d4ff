"""Evaluate a dual encoder on the held-out split: zero-shot top-1/top-5 and retrieval R@k.

A model whose ``text_input`` is ``"pixels"`` (CLIPPO) reads captions and class prompts rendered
as images at the held-out images' size (``vlmray.data.render``) instead of token ids."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vlmray.data.tokenize import Tokenizer
from vlmray.eval.heldout import HeldOut, class_prompts
from vlmray.eval.metrics import class_embeddings, recall_at_k, topk_accuracy


class DualEncoder(Protocol):
    """What evaluation needs from a model (``vlmray.models.DualEncoder`` and every arch): the
    two towers, each returning ``(embeds (B, D), ...)``, and ``nn.Module``'s mode and
    parameters. Evaluation sits below the models layer, so it names them by this shape."""

    training: bool

    def encode_image(self, pixels: Tensor, *, refs: Any = None) -> tuple[Tensor, ...]: ...

    def encode_text(self, text: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]: ...

    def parameters(self) -> Any: ...

    def eval(self) -> nn.Module: ...

    def train(self, mode: bool = True) -> nn.Module: ...


class ObjectiveEvaluation(Protocol):
    """What the objectives' own held-out measurements look like (``ObjectiveMix.evaluate``):
    generated-caption overlap, ITM accuracy and the like, by metric name."""

    def evaluate(self, model: Any, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]: ...


@torch.no_grad()
def _embed_images(model: DualEncoder, pixels: Tensor, bs: int, device: torch.device,
                  refs: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    def refs_of(i: int) -> tuple[Tensor, ...] | None:
        return None if refs is None else tuple(r[i:i + bs].to(device) for r in refs)

    return torch.cat([model.encode_image(pixels[i:i + bs].to(device), refs=refs_of(i))[0].float()
                      for i in range(0, len(pixels), bs)])


@torch.no_grad()
def _embed_texts(model: DualEncoder, ids: Tensor, mask: Tensor, bs: int,
                 device: torch.device) -> Tensor:
    return torch.cat([model.encode_text(ids[i:i + bs].to(device),
                                        mask[i:i + bs].to(device))[0].float()
                      for i in range(0, len(ids), bs)])


@torch.no_grad()
def _embed_text_pixels(model: DualEncoder, pixels: Tensor, bs: int,
                       device: torch.device) -> Tensor:
    return torch.cat([model.encode_text(pixels[i:i + bs].to(device))[0].float()
                      for i in range(0, len(pixels), bs)])


def reads_rendered_text(model: object) -> bool:
    """Whether ``model.encode_text`` takes text drawn as images (CLIPPO) rather than token ids."""
    return getattr(model, "text_input", "tokens") == "pixels"


def _text_embeds(model: DualEncoder, data: HeldOut, tokenizer: Tokenizer, bs: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """(caption embeds (N, D), class-prompt embeds (C * T, D)), from token ids or rendered text."""
    if reads_rendered_text(model):
        size = data.pixels.shape[-1]
        return (_embed_text_pixels(model, data.rendered_captions(size), bs, device),
                _embed_text_pixels(model, data.rendered_prompts(size), bs, device))
    txt = _embed_texts(model, data.tokens, data.token_mask, bs, device)
    ids, mask = tokenizer(class_prompts(data.classnames, data.templates))
    prompts = _embed_texts(model, torch.from_numpy(ids), torch.from_numpy(mask), bs, device)
    return txt, prompts


@torch.no_grad()
def evaluate(model: DualEncoder, data: HeldOut, tokenizer: Tokenizer, *,
             batch_size: int = 256,
             objectives: ObjectiveEvaluation | None = None) -> dict[str, float]:
    """Returns zero_shot_top1/top5 (over the rows with a label), zero_shot_chance and
    retrieval_{i2t,t2i}_r{1,5,10} (over every row), plus
    what the model measures itself (``model.evaluate_heldout(data, tokenizer)``, e.g. SegCLIP's
    segmentation mIoU) and what the objectives' own parts measure (``ObjectiveMix.evaluate``,
    e.g. generated-caption overlap, ITM accuracy)."""
    metrics = _evaluate_dual(model, data, tokenizer, batch_size)
    was_training = model.training
    model.eval()
    if hasattr(model, "evaluate_heldout"):
        metrics.update(model.evaluate_heldout(data, tokenizer))
    if objectives is not None:
        metrics.update(objectives.evaluate(model, data, tokenizer))
    model.train(was_training)
    return metrics


def _evaluate_dual(model: DualEncoder, data: HeldOut, tokenizer: Tokenizer,
                   batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    img = _embed_images(model, data.pixels, batch_size, device, data.refs)  # (N, D)
    txt, prompts = _text_embeds(model, data, tokenizer, batch_size, device)  # (N, D), (C*T, D)
    classes = class_embeddings(prompts, len(data.classnames))              # (C, D)
    labelled = data.labels >= 0           # rows without a label count in retrieval only
    acc = topk_accuracy((img @ classes.T)[labelled.to(device)],
                        data.labels[labelled].to(device), (1, 5))
    model.train(was_training)
    return {"zero_shot_top1": acc[1], "zero_shot_top5": acc[5],
            "zero_shot_chance": 1.0 / len(data.classnames), **recall_at_k(img, txt)}


__all__ = ["DualEncoder", "ObjectiveEvaluation", "evaluate", "reads_rendered_text"]
