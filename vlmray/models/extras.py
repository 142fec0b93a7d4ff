"""The ``Outputs.extra`` entries any model with ``encode_image`` / ``encode_text`` produces the
same way: neighbour captions and augmented image and text views, re-encoded by its own towers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from torch import Tensor

from vlmray.data import schema
from vlmray.models.outputs import (
    COMPLETION_EMBEDS,
    IMAGE_VIEW_EMBEDS,
    MASKED_IMAGE_TOKENS,
    MASKED_TEXT_TOKENS,
    NN_TEXT_EMBEDS,
    SYNTHETIC_TEXT_EMBEDS,
    TEXT_VIEW_EMBEDS,
)


def batch_columns(batch: Mapping[str, Tensor], names: tuple[str, ...], why: str) -> list[Tensor]:
    """``[batch[n] for n in names]``, or a clear error naming the missing columns and ``why``
    they are needed."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"batch has no column(s) {missing}, needed by {why}; the batch has "
                         f"{sorted(batch)}")
    return [batch[n] for n in names]


def encode_view_extras(model: Any, batch: Mapping[str, Tensor], needs: Collection[str], *,
                       view_refs: Callable[[int], Any] | None = None) -> dict[str, Tensor]:
    """``nn_text_embeds`` (B, D), ``image_view_embeds`` (B, V, D) and ``text_view_embeds``
    (B, V_t, D) when in ``needs``. ``view_refs(V)``: RA-CLIP references repeated for V views
    of each image (None: the model takes none)."""
    extra: dict[str, Tensor] = {}
    if NN_TEXT_EMBEDS in needs:
        ids, mask = batch_columns(batch, (schema.NN_TOKENS, schema.NN_TOKEN_MASK),
                                  "nn_text_embeds (the DeCLIP nearest-neighbour stage)")
        extra[NN_TEXT_EMBEDS] = model.encode_text(ids, mask)[0]                 # (B, D)
    if IMAGE_VIEW_EMBEDS in needs:
        (views,) = batch_columns(batch, (schema.PIXELS_VIEWS,),
                                 "image_view_embeds (data.views.image)")
        b, v = views.shape[:2]
        refs = view_refs(v) if view_refs is not None else None
        flat = views.flatten(0, 1)
        emb = (model.encode_image(flat) if refs is None
               else model.encode_image(flat, refs=refs))[0]
        extra[IMAGE_VIEW_EMBEDS] = emb.view(b, v, -1)                            # (B, V, D)
    if TEXT_VIEW_EMBEDS in needs:
        ids, mask = batch_columns(batch, (schema.TOKENS_VIEWS, schema.TOKEN_MASK_VIEWS),
                                  "text_view_embeds (data.views.text)")
        b, v = ids.shape[:2]
        emb = model.encode_text(ids.flatten(0, 1), mask.flatten(0, 1))[0]
        extra[TEXT_VIEW_EMBEDS] = emb.view(b, v, -1)                             # (B, V_t, D)
    if COMPLETION_EMBEDS in needs:
        ids, mask = batch_columns(batch, (schema.COMPLETION_TOKENS, schema.COMPLETION_MASK),
                                  "completion_embeds (nlip_completion's prepare adds them)")
        extra[COMPLETION_EMBEDS] = model.encode_text(ids, mask)[0]               # (B, D)
    if SYNTHETIC_TEXT_EMBEDS in needs:
        ids, mask = batch_columns(batch, (schema.SYNTHETIC_TOKENS, schema.SYNTHETIC_TOKEN_MASK),
                                  "synthetic_text_embeds (ALIP: data.extra_texts="
                                  "['synthetic_caption'])")
        extra[SYNTHETIC_TEXT_EMBEDS] = model.encode_text(ids, mask)[0]           # (B, D)
    return extra


def encode_masked_extras(model: Any, batch: Mapping[str, Tensor],
                         needs: Collection[str]) -> dict[str, Tensor]:
    """``masked_image_tokens`` (B, N_vis, D) and ``masked_text_tokens`` (B, L, D) when in
    ``needs``, through ``model.encode_masked_image(pixels, patch_mask)`` and
    ``model.encode_masked_text(mlm_ids, mask)``; clear errors when the batch lacks
    ``PATCH_MASK`` / ``MLM_TOKENS`` or the model cannot encode masked inputs."""
    extra: dict[str, Tensor] = {}
    for key, method in ((MASKED_IMAGE_TOKENS, "encode_masked_image"),
                        (MASKED_TEXT_TOKENS, "encode_masked_text")):
        if key in needs and not hasattr(model, method):
            raise ValueError(f"{key} needs a model with {method}(); {type(model).__name__} has "
                             "none")
    if MASKED_IMAGE_TOKENS in needs:
        pixels, mask = batch_columns(batch, (schema.PIXELS, schema.PATCH_MASK),
                                     "masked_image_tokens (a masked-image objective's prepare, "
                                     "e.g. mim or mmm, adds patch_mask)")
        extra[MASKED_IMAGE_TOKENS] = model.encode_masked_image(pixels, mask)   # (B, N_vis, D)
    if MASKED_TEXT_TOKENS in needs:
        ids, mask = batch_columns(batch, (schema.MLM_TOKENS, schema.TOKEN_MASK),
                                  "masked_text_tokens (data.views.mlm_prob > 0)")
        extra[MASKED_TEXT_TOKENS] = model.encode_masked_text(ids, mask)        # (B, L, D)
    return extra


__all__ = ["batch_columns", "encode_masked_extras", "encode_view_extras"]
