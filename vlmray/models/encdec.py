"""PaLI's image+text -> text encoder-decoder, small: a bidirectional transformer encoder over
[image tokens; embedded prefix text] whose states the causal text decoder cross-attends to.

    encdec = EncoderDecoder(vocab_size=1024, dim=128, encoder_layers=2, decoder_layers=2)
    logits = encdec(image_tokens, prefix, prefix_mask, target, target_mask)     # (B, T, V)
    ids = encdec.generate(image_tokens, prefix, prefix_mask, max_len=16, bos_id=1, eos_id=2,
                          pad_id=0)

As in PaLI (mT5 underneath), encoder and decoder share the token embedding. Single-device code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmray.models.decoder import Block, TextDecoder, self_attention_mask


class PrefixEncoder(nn.Module):
    """[image tokens (B, N, D); prefix ids (B, P) embedded] -> states (B, N + P, D), with
    learned position and modality (image / text) embeddings and bidirectional self-attention
    that never attends to padded prefix positions."""

    def __init__(self, embed: nn.Embedding, *, layers: int, heads: int, max_len: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"PrefixEncoder needs layers >= 1, got {layers}")
        dim = embed.embedding_dim
        self.embed = embed                                  # shared with the decoder
        self.max_len = max_len
        self.text_pos = nn.Parameter(torch.randn(max_len, dim) * 0.01)
        self.modality = nn.Parameter(torch.randn(2, dim) * 0.01)   # 0: image, 1: text
        self.blocks = nn.ModuleList(Block(dim, heads, cross=False, mlp_ratio=mlp_ratio)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_tokens: Tensor, prefix: Tensor,
                prefix_mask: Tensor) -> tuple[Tensor, Tensor]:
        """image_tokens (B, N, D), prefix (B, P), prefix_mask (B, P) nonzero = real ->
        (states (B, N + P, D), memory mask (B, N + P) bool, True = real)."""
        b, n, _ = image_tokens.shape
        p = prefix.shape[1]
        if prefix.shape != prefix_mask.shape or prefix.shape[0] != b:
            raise ValueError(f"PrefixEncoder: prefix {tuple(prefix.shape)} and mask "
                             f"{tuple(prefix_mask.shape)} must both be ({b}, P)")
        if p > self.max_len:
            raise ValueError(f"PrefixEncoder: prefix of {p} tokens exceeds max_len={self.max_len}")
        text = self.embed(prefix) + self.text_pos[:p] + self.modality[1]         # (B, P, D)
        x = torch.cat((image_tokens + self.modality[0], text.to(image_tokens.dtype)), dim=1)
        real = torch.cat((torch.ones(b, n, dtype=torch.bool, device=prefix.device),
                          prefix_mask.bool()), dim=1)                            # (B, N + P)
        allow = self_attention_mask(real, n + p, causal=False, device=x.device)
        for block in self.blocks:
            x = block(x, allow)
        return self.norm(x), real


class EncoderDecoder(nn.Module):
    """PaLI-style: ``PrefixEncoder`` over image tokens + prefix text, and a ``TextDecoder``
    (every layer cross-attends to the encoder states, T5-style) that predicts the target."""

    def __init__(self, vocab_size: int, dim: int, *, encoder_layers: int = 2,
                 decoder_layers: int = 2, heads: int = 4, max_len: int = 64,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.decoder = TextDecoder(vocab_size, dim, unimodal_layers=0,
                                   multimodal_layers=decoder_layers, heads=heads,
                                   max_len=max_len, mlp_ratio=mlp_ratio)
        self.encoder = PrefixEncoder(self.decoder.embed, layers=encoder_layers, heads=heads,
                                     max_len=max_len, mlp_ratio=mlp_ratio)

    def encode(self, image_tokens: Tensor, prefix: Tensor,
               prefix_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(memory (B, N + P, D), memory mask (B, N + P))."""
        return self.encoder(image_tokens, prefix, prefix_mask)

    def forward(self, image_tokens: Tensor, prefix: Tensor, prefix_mask: Tensor,
                target: Tensor, target_mask: Tensor | None = None) -> Tensor:
        """image_tokens (B, N, D), prefix (B, P), prefix_mask (B, P), target (B, T),
        target_mask (B, T) -> next-token logits (B, T, V) of the target."""
        memory, memory_mask = self.encode(image_tokens, prefix, prefix_mask)
        return self.decoder(target, target_mask, memory, memory_mask)

    @torch.no_grad()
    def generate(self, image_tokens: Tensor, prefix: Tensor, prefix_mask: Tensor, *,
                 max_len: int, beam_size: int = 1, bos_id: int, eos_id: int,
                 pad_id: int) -> Tensor:
        """The decoder's continuation of each (image, prefix): ids (B, max_len) starting with
        BOS (``TextDecoder.generate``)."""
        memory, memory_mask = self.encode(image_tokens, prefix, prefix_mask)
        return self.decoder.generate(memory, memory_mask, max_len=max_len,
                                     beam_size=beam_size, bos_id=bos_id, eos_id=eos_id,
                                     pad_id=pad_id)


__all__ = ["EncoderDecoder", "PrefixEncoder"]
