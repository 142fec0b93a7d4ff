"""Shared test input for the caption decoders (CoCa's ``caption``, ``pali``)."""

from __future__ import annotations

import torch
from torch import Tensor

from vlmray.data import schema


def caption_batch(lengths: list[int], length: int, vocab: int, image_shape: tuple[int, ...],
                  seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Captions [BOS w.. EOS PAD..] of the given real lengths in a (B, ``length``) batch (a row
    as long as ``length`` is truncated: no EOS), plus float64 image tokens needing grad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0] = 1
        if n < length:
            ids[i, n - 1] = 2
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    img = torch.randn(*image_shape, generator=g, dtype=torch.float64, requires_grad=True)
    return {schema.TOKENS: ids, schema.TOKEN_MASK: mask}, img
