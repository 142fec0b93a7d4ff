"""Zero-shot classification and image<->text retrieval, from embeddings (plain PyTorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """logits (N, C), labels (N,) -> {k: fraction of rows whose label is in the top k}."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices        # (N, K)
    hit = top == labels.unsqueeze(1)
    return {k: hit[:, :k].any(1).float().mean().item() for k in ks}


def class_embeddings(prompt_embeds: Tensor, num_classes: int) -> Tensor:
    """(C * T, D) normalised prompt embeddings, class-major -> (C, D) normalised class means."""
    per_class = prompt_embeds.view(num_classes, -1, prompt_embeds.shape[-1]).mean(1)
    return F.normalize(per_class, dim=-1)


def recall_at_k(image_embeds: Tensor, text_embeds: Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Paired (N, D) embeddings (row i's caption is text i) -> i2t and t2i recall@k."""
    sims = image_embeds @ text_embeds.T                                    # (N, N)
    target = torch.arange(sims.shape[0], device=sims.device)
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        for k, v in topk_accuracy(s, target, ks).items():
            out[f"retrieval_{name}_r{k}"] = v
    return out


__all__ = ["class_embeddings", "recall_at_k", "topk_accuracy"]
