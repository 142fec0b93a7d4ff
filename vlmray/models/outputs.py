"""What a model returns: only the fields that the active objectives ask for."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

NN_TEXT_EMBEDS = "nn_text_embeds"
"""``Outputs.extra`` key (and ``needs`` name): (B, D) normalised embeddings of each row's
nearest-neighbour caption (``NN_TOKENS``), encoded by the online text tower (DeCLIP NNS)."""

IMAGE_VIEW_EMBEDS = "image_view_embeds"
"""(B, V, D) normalised embeddings of the augmented image views (``schema.PIXELS_VIEWS``), in
``data.views.image`` order (DeCLIP's second view, PyramidCLIP's local crops...)."""
TEXT_VIEW_EMBEDS = "text_view_embeds"
"""(B, V_t, D) normalised embeddings of the derived texts (``schema.TOKENS_VIEWS``), in
``data.views.text`` order (EDA augmentations, PyramidCLIP's summary and attribute texts)."""
MLM_STATES = "mlm_states"
"""(B, L, C) the text tower's hidden states (width C = ``model.text.width``, not projected) for
the masked captions ``schema.MLM_TOKENS``; an MLM head predicts ``schema.MLM_LABELS``."""
MASKED_IMAGE_TOKENS = "masked_image_tokens"
"""(B, N_vis, D) projected trunk features of the VISIBLE patches only (MAE-style encoding: the
masked patches of ``schema.PATCH_MASK`` are dropped before the transformer), in ascending patch
order, without prefix (CLS) tokens. Every row masks the same number of patches."""
MASKED_TEXT_TOKENS = "masked_text_tokens"
"""(B, L, D) projected text-tower states of the masked captions ``schema.MLM_TOKENS``
(masked multimodal modelling fuses them with ``MASKED_IMAGE_TOKENS``)."""
COMPLETION_EMBEDS = "completion_embeds"
"""(B, D) normalised text embeddings of each row's generated caption
(``schema.COMPLETION_TOKENS``, NLIP's noise completion), encoded by the online text tower."""
SYNTHETIC_TEXT_EMBEDS = "synthetic_text_embeds"
"""(B, D) normalised text embeddings of each row's synthetic caption
(``schema.SYNTHETIC_TOKENS``, ALIP's second text), encoded by the same text tower."""
EXTRA_OUTPUTS = (NN_TEXT_EMBEDS, IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS, MLM_STATES,
                 MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS, COMPLETION_EMBEDS, SYNTHETIC_TEXT_EMBEDS)


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


__all__ = ["EXTRA_OUTPUTS", "IMAGE_VIEW_EMBEDS", "MASKED_IMAGE_TOKENS", "MASKED_TEXT_TOKENS",
           "MLM_STATES", "NN_TEXT_EMBEDS", "Outputs", "SYNTHETIC_TEXT_EMBEDS",
           "TEXT_VIEW_EMBEDS"]
