"""The held-out split, loaded once into tensors (no Ray): images, captions, labels, classes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from vlmray.data import schema
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.shards import iter_shards, load_classes
from vlmray.data.tokenize import Tokenizer


@dataclass
class HeldOut:
    pixels: Tensor          # (N, 3, S, S) uint8
    tokens: Tensor          # (N, L) int64, the paired captions
    token_mask: Tensor      # (N, L)
    labels: Tensor          # (N,) int64
    classnames: list[str]
    templates: list[str]
    rows_rejected: int = 0

    def __len__(self) -> int:
        return self.pixels.shape[0]


def load_heldout(uri: str, spec: DecodeSpec, tokenizer: Tokenizer, *, max_samples: int) -> HeldOut:
    """Reads up to ``max_samples`` rows of the clean split at ``uri`` and its ``classes.json``."""
    rows = list(itertools.islice(iter_shards(uri), max_samples))
    if not rows:
        raise FileNotFoundError(f"held-out split {uri!r} has no samples")
    batch = prepare_rows([r[schema.KEY] for r in rows], [r.get(schema.IMAGE) for r in rows],
                         [r.get(schema.TEXT) for r in rows], [r.get(schema.META) for r in rows],
                         spec, tokenizer)
    ok = batch[schema.REJECT_REASON] == ""
    classnames, templates = load_classes(uri)
    return HeldOut(
        pixels=torch.from_numpy(batch[schema.PIXELS][ok]),
        tokens=torch.from_numpy(batch[schema.TOKENS][ok]),
        token_mask=torch.from_numpy(batch[schema.TOKEN_MASK][ok]),
        labels=torch.from_numpy(batch[schema.LABEL][ok]),
        classnames=classnames, templates=templates, rows_rejected=int((~ok).sum()),
    )


def class_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: (C * T) strings."""
    return [t.format(c) for c in classnames for t in templates]


__all__ = ["HeldOut", "class_prompts", "load_heldout"]
