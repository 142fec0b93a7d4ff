"""What a model returns: only the fields that the active objectives ask for."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

NN_TEXT_EMBEDS = "nn_text_embeds"
"""``Outputs.extra`` key (and ``needs`` name): (B, D) normalised embeddings of each row's
nearest-neighbour caption (``NN_TOKENS``), encoded by the online text tower (DeCLIP NNS)."""


@dataclass
class Outputs:
    """Model outputs for one local batch of size B.

    Attributes:
        image_embeds: (B, D) L2-normalised image embeddings.
        text_embeds: (B, D) L2-normalised text embeddings.
        image_tokens: (B, N_img, D) per-position features of the vision trunk, projected (FILIP,
            region-word...); ViTs include their prefix (CLS) tokens first.
        text_tokens: (B, N_txt, D) per-token features, with ``text_mask`` (B, N_txt).
        logit_scale: () the learnable inverse temperature, already exponentiated.
        logit_bias: () optional learnable bias (SigLIP).
        extra: anything else (decoder logits, fused states), keyed by name.
    """

    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None
    image_tokens: Tensor | None = None
    text_tokens: Tensor | None = None
    text_mask: Tensor | None = None
    logit_scale: Tensor | None = None
    logit_bias: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


__all__ = ["NN_TEXT_EMBEDS", "Outputs"]
