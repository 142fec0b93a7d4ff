"""Region-word grounding accuracy on the held-out split (region-word matching, issue 7).

For every held-out box (the JSON sidecar's ``boxes``, in ``HeldOut.metas``) the region feature
is pooled from ``model.encode_image(pixels, tokens=True)[1]`` (``vlmray.models.regions``) and
scored against one phrase feature per class: the class name tokenised as a text, the mean of its
word tokens' projected states from ``model.encode_text`` (specials and padding left out),
normalised. The box's true class is its phrase's index in ``classnames`` (the row's label when
the phrase is not a class name).

    grounding_top1    = fraction of boxes whose best-scoring class is the true one
    grounding_chance  = 1 / C

Boxes are used as stored: right for the built-in data (square images, so decoding's centre
crop keeps the whole image); a dataset of non-square images would need its boxes mapped through
the crop as ``vlmray.data.regions.map_box`` does for training.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.data.tokenize import Tokenizer
from vlmray.eval.heldout import HeldOut

RegionFeatures = Callable[[Tensor, Tensor], Tensor]
"""(image tokens (B, N, D), boxes (B, K, 4)) -> normalised region features (B, K, D)."""


def heldout_boxes(data: HeldOut) -> tuple[Tensor, Tensor, Tensor]:
    """(boxes (N, K, 4) float32 zero-padded, classes (N, K) int64 with -1 = no box,
    any (N,) bool: rows with at least one box) from the held-out sidecars."""
    index = {name: c for c, name in enumerate(data.classnames)}
    per_row: list[list[tuple[list[float], int]]] = []
    for row, meta in enumerate(data.metas):
        try:
            side = json.loads(meta) if meta else {}
        except ValueError:
            side = {}
        side = side if isinstance(side, dict) else {}
        boxes, phrases = side.get(schema.BOXES) or [], side.get(schema.PHRASES) or []
        label = int(data.labels[row])
        items = []
        for j, box in enumerate(boxes):
            phrase = phrases[j] if j < len(phrases) else ""
            cls = index.get(str(phrase), label)
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                continue
            if x1 > x0 and y1 > y0 and cls >= 0:
                items.append(([x0, y0, x1, y1], cls))
        per_row.append(items)
    k = max((len(items) for items in per_row), default=0)
    boxes_t = torch.zeros(len(per_row), max(k, 1), 4)
    classes = torch.full((len(per_row), max(k, 1)), -1, dtype=torch.long)
    for row, items in enumerate(per_row):
        for j, (box, cls) in enumerate(items):
            boxes_t[row, j], classes[row, j] = torch.tensor(box), cls
    return boxes_t, classes, (classes >= 0).any(1)


@torch.no_grad()
def class_phrase_features(model: nn.Module, classnames: list[str], tokenizer: Tokenizer,
                          device: torch.device) -> Tensor:
    """(C, D): per class name, the normalised mean of its word tokens' projected text states."""
    ids, mask = (torch.from_numpy(a).to(device) for a in tokenizer(classnames))
    _, states = model.encode_text(ids, mask)                                    # (C, L, D)
    words = mask.bool()
    for special in tokenizer.special_ids:
        words &= ids != special
    w = words.to(states.dtype)[..., None]
    return F.normalize((states * w).sum(1) / w.sum(1).clamp(min=1.0), dim=-1)


@torch.no_grad()
def grounding_metrics(model: nn.Module, data: HeldOut, tokenizer: Tokenizer, *,
                      region_features: RegionFeatures,
                      batch_size: int = 128) -> dict[str, float]:
    """``grounding_top1`` and ``grounding_chance`` (module docstring) of ``model`` whose image
    tokens ``region_features`` turns into region features (the objective's pooling and head)."""
    if not data.metas or len(data.metas) != len(data):
        raise ValueError(f"grounding needs HeldOut.metas for every row (the sidecars with "
                         f"boxes); have {len(data.metas)} for {len(data)} rows")
    device = next(model.parameters()).device
    phrases = class_phrase_features(model, data.classnames, tokenizer, device)   # (C, D)
    boxes, classes, keep = heldout_boxes(data)
    rows = torch.nonzero(keep).squeeze(1)
    hits, total = 0, 0
    for start in range(0, len(rows), batch_size):
        sel = rows[start:start + batch_size]
        _, tokens = model.encode_image(data.pixels[sel].to(device), tokens=True)   # (b, N, D)
        if tokens is None:
            raise ValueError("grounding needs the model's image tokens (encode_image(tokens="
                             "True) returned None)")
        regions = region_features(tokens, boxes[sel].to(device, tokens.dtype))       # (b, K, D)
        best = (regions @ phrases.to(regions.dtype).T).argmax(-1).cpu()             # (b, K)
        real = classes[sel] >= 0
        hits += int(((best == classes[sel]) & real).sum())
        total += int(real.sum())
    return {"grounding_top1": hits / max(total, 1),
            "grounding_chance": 1.0 / len(data.classnames)}


__all__ = ["class_phrase_features", "grounding_metrics", "heldout_boxes"]
