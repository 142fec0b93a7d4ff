r"""OneR's single-tower model (Jang et al., 2023, "Unifying Vision-Language Representation Space
with Single-tower Transformer", AAAI).

ONE transformer encoder f reads images, captions and image+caption sequences alike; only the
input embeddings are modality-specific:

    image   I (B, 3, H, W) -> [CLS; P_1 .. P_n] + [0; pos^I]    P_k = Conv_{p x p}(I) patches
    caption T (B, L)       -> [CLS; E(t_1) .. E(t_L)] + [0; pos^T]
    mixed   [I_i; T_j]     -> [CLS; P(I_i) + pos^I; E(T_j) + pos^T]   mask [1; 1..1; m(T_j)]

and every sequence is embedded the same way: z = normalize(W LN(f(x)[CLS])), one shared
projection W into ``cfg.embed_dim``. The encoder is shaped from ``cfg.text`` (hidden_size,
num_hidden_layers, num_attention_heads, intermediate_size); the patch size is
``cfg.vision_kwargs["patch_size"]``; ``cfg.vision`` is not used (it is only name-checked).

Mixed inputs (for OneR's XMC / CIC / CMC, ``vlmray.objectives.contrastive.oner``) are built here
when ``needs`` names their ``Outputs.extra`` keys. The mixing partner of local row i is
pi(i) = (i + 1) mod B, a roll by one within the local batch (deterministic, no RNG state, and
the same on every rank; the objective maps it to global columns).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.models import MODEL_ARCHS
from vlmray.models.dual_encoder import LogitScale
from vlmray.models.extras import encode_view_extras
from vlmray.models.outputs import MLM_STATES, Outputs

if TYPE_CHECKING:
    from vlmray.config import ModelConfig

ONER_MIXED_EMBEDS = "oner_mixed_embeds"
"""``Outputs.extra`` key (and ``needs`` name): (B, D) normalised embeddings of the cross-modal
mixes m_i = f([I_i; T_pi(i)]): row i's image followed by its partner's caption."""
ONER_PAIRED_EMBEDS = "oner_paired_embeds"
"""(B, D) normalised embeddings of the in-context pairs c_i = f([I_i; T_i]): row i's image
followed by its own caption."""
ONER_PARTNER = "oner_partner"
"""(B,) int64 local index pi(i) = (i + 1) mod B of the row whose caption row i's mix carries;
set whenever either of the two keys above is computed."""
ONER_EXTRAS = (ONER_MIXED_EMBEDS, ONER_PAIRED_EMBEDS)

_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's pixel statistics
_STD = (0.26862954, 0.26130258, 0.27577711)


def mix_partner(batch_size: int, device: torch.device | None = None) -> Tensor:
    """pi(i) = (i + 1) mod B, int64 (B,): the row whose caption row i is mixed with."""
    return torch.arange(batch_size, device=device).roll(-1)


class OneR(LogitScale):
    """One transformer for images, captions and their concatenations -> (B, D) embeddings.

    Exposes the dual encoder's interface (``forward(batch, needs)``, ``encode_image``,
    ``encode_text``, ``logit_scale``, ``logit_bias``) so CLIP's loss, training and evaluation
    work unchanged.
    """

    def __init__(self, *, width: int, layers: int, heads: int, mlp_dim: int, patch_size: int,
                 image_size: int, vocab_size: int, context_length: int, embed_dim: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 init_logit_bias: float | None = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"oner: image_size {image_size} is not a multiple of the patch "
                             f"size {patch_size}")
        self.width, self.patch_size = width, patch_size
        num_patches = (image_size // patch_size) ** 2
        # modality-specific input embeddings
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.image_pos = nn.Parameter(torch.randn(num_patches, width) * 0.02)
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)   # CLIP's init: both inputs small
        self.text_pos = nn.Parameter(torch.randn(context_length, width) * 0.02)
        # shared: [CLS], the encoder, the final norm and the projection
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, mlp_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.init_logit_scale(init_temperature, max_logit_scale, init_logit_bias)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    # --- modality-specific input embeddings --------------------------------------------------

    def image_inputs(self, pixels: Tensor) -> Tensor:
        """uint8 or float (B, 3, H, W) -> patch embeddings plus positions (B, n, C)."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float().div(255.0).sub(self.mean).div(self.std)
        patches = self.patch_embed(pixels.to(self.cls.dtype)).flatten(2).transpose(1, 2)
        return patches + self.image_pos                                     # (B, n, C)

    def text_inputs(self, ids: Tensor) -> Tensor:
        """ids (B, L) -> token embeddings plus positions (B, L, C)."""
        return self.token_embed(ids) + self.text_pos[: ids.shape[1]]

    # --- the shared encoder -------------------------------------------------------------------

    def encode_sequence(self, parts: list[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """[CLS; parts...] through the shared encoder.

        parts: embedded inputs (B, n_k, C), concatenated in order; mask: (B, sum n_k), 1 = real.
        Returns (normalised embedding (B, D), projected states (B, 1 + sum n_k, D)).
        """
        cls = self.cls.expand(parts[0].shape[0], 1, -1)                      # (B, 1, C)
        x = torch.cat([cls, *parts], dim=1)                                  # (B, S, C)
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1).bool()
        states = self.norm(self.encoder(x, src_key_padding_mask=~keep))      # (B, S, C)
        tokens = self.proj(states)                                           # (B, S, D)
        return F.normalize(tokens[:, 0], dim=-1), tokens

    def encode_image(self, pixels: Tensor, *, tokens: bool = False,
                     refs: object = None) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (B, D), projected states (B, 1 + n, D) with [CLS] first, or None)."""
        if refs is not None:
            raise ValueError("oner has no retrieval augmentation module; encode_image got refs")
        x = self.image_inputs(pixels)                                        # (B, n, C)
        emb, states = self.encode_sequence([x], x.new_ones(x.shape[:2]))
        return emb, (states if tokens else None)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(text_embeds (B, D), projected token states (B, L, D), aligned with ``mask``)."""
        emb, states = self.encode_sequence([self.text_inputs(ids)], mask)
        return emb, states[:, 1:]

    def encode_mixed(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """f([I; T]): each row's image patches followed by the given caption -> (B, D)."""
        x = self.image_inputs(pixels)                                        # (B, n, C)
        full = torch.cat([mask.new_ones(x.shape[:2]), mask], dim=1)         # (B, n + L)
        return self.encode_sequence([x, self.text_inputs(ids)], full)[0]

    # --- the dual encoder's interface ---------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], needs: Collection[str] = ()) -> Outputs:
        """Both embeddings and the scale always; token states and extras when in ``needs``.

        Batch columns read: PIXELS, TOKENS, TOKEN_MASK (+ the views / neighbour columns for
        those extras). ``oner_mixed_embeds`` / ``oner_paired_embeds`` add ``oner_partner``.
        """
        pixels, ids, mask = batch[schema.PIXELS], batch[schema.TOKENS], batch[schema.TOKEN_MASK]
        img, img_tok = self.encode_image(pixels, tokens="image_tokens" in needs)
        txt, txt_tok = self.encode_text(ids, mask)
        out = Outputs(image_embeds=img, text_embeds=txt, image_tokens=img_tok,
                      logit_scale=self.logit_scale, logit_bias=self.logit_bias)
        if "text_tokens" in needs:
            out.text_tokens, out.text_mask = txt_tok, mask
        out.extra.update(self.encode_mixes(pixels, ids, mask, needs))
        out.extra.update(self.encode_extras(batch, needs))
        return out

    def encode_mixes(self, pixels: Tensor, ids: Tensor, mask: Tensor,
                     needs: Collection[str]) -> dict[str, Tensor]:
        """OneR's mixed inputs named in ``needs``; both kinds share one encoder call."""
        wanted = [k for k in ONER_EXTRAS if k in needs]
        if not wanted:
            return {}
        partner = mix_partner(ids.shape[0], device=ids.device)             # (B,)
        own = torch.arange(ids.shape[0], device=ids.device)                 # (B,)
        rows = {ONER_MIXED_EMBEDS: partner, ONER_PAIRED_EMBEDS: own}      # whose caption
        take = torch.cat([rows[k] for k in wanted])                         # (k*B,)
        emb = self.encode_mixed(pixels.repeat(len(wanted), 1, 1, 1), ids[take], mask[take])
        extra = dict(zip(wanted, emb.chunk(len(wanted))))                    # (B, D) each
        extra[ONER_PARTNER] = partner
        return extra

    def encode_extras(self, batch: Mapping[str, Tensor],
                      needs: Collection[str]) -> dict[str, Tensor]:
        """The dual encoder's re-encoded extras: neighbour captions, image and text views."""
        if MLM_STATES in needs:
            raise ValueError("oner does not produce mlm_states (it has no text-only tower)")
        return encode_view_extras(self, batch, needs)


@MODEL_ARCHS.register("oner")
def build_oner(cfg: ModelConfig, *, image_size: int, vocab_size: int,
               context_length: int) -> OneR:
    """OneR from a ModelConfig: encoder shape from ``cfg.text``, patch from ``vision_kwargs``."""
    text = cfg.text
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if k not in text]
    if missing:
        raise ValueError(f"oner: model.text lacks {missing} (the shared encoder's shape)")
    if cfg.text_weights or cfg.vision_weights or cfg.ra_layers:
        raise ValueError("oner is built from scratch: it takes no text_weights, vision_weights "
                         "or retrieval augmentation (ra_layers)")
    width, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    if heads <= 0 or width % heads:
        raise ValueError(f"oner: num_attention_heads {heads} must divide hidden_size {width}")
    patch = int(cfg.vision_kwargs.get("patch_size", 16))
    return OneR(width=width, layers=int(text["num_hidden_layers"]), heads=heads,
                mlp_dim=int(text["intermediate_size"]), patch_size=patch, image_size=image_size,
                vocab_size=vocab_size, context_length=context_length, embed_dim=cfg.embed_dim,
                init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                init_logit_bias=cfg.init_logit_bias)


__all__ = ["ONER_EXTRAS", "ONER_MIXED_EMBEDS", "ONER_PAIRED_EMBEDS", "ONER_PARTNER", "OneR",
           "build_oner", "mix_partner"]
