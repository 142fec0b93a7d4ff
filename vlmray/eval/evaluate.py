"""Evaluate a dual encoder on the held-out split: zero-shot top-1/top-5 and retrieval R@k."""

from __future__ import annotations

import torch
from torch import Tensor

from vlmray.data.tokenize import Tokenizer
from vlmray.eval.heldout import HeldOut, class_prompts
from vlmray.eval.metrics import class_embeddings, recall_at_k, topk_accuracy
from vlmray.models import DualEncoder


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
    return torch.cat([model.encode_text(ids[i:i + bs].to(device), mask[i:i + bs].to(device))[0].float()
                      for i in range(0, len(ids), bs)])


@torch.no_grad()
def evaluate(model: DualEncoder, data: HeldOut, tokenizer: Tokenizer, *,
             batch_size: int = 256) -> dict[str, float]:
    """Returns zero_shot_top1/top5, zero_shot_chance and retrieval_{i2t,t2i}_r{1,5,10}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    img = _embed_images(model, data.pixels, batch_size, device, data.refs)  # (N, D)
    txt = _embed_texts(model, data.tokens, data.token_mask, batch_size, device)
    ids, mask = tokenizer(class_prompts(data.classnames, data.templates))
    prompts = _embed_texts(model, torch.from_numpy(ids), torch.from_numpy(mask), batch_size, device)
    classes = class_embeddings(prompts, len(data.classnames))              # (C, D)
    acc = topk_accuracy(img @ classes.T, data.labels.to(device), (1, 5))
    model.train(was_training)
    return {"zero_shot_top1": acc[1], "zero_shot_top5": acc[5],
            "zero_shot_chance": 1.0 / len(data.classnames), **recall_at_k(img, txt)}


__all__ = ["evaluate"]
