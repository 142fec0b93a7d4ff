"""Open-vocabulary semantic segmentation from grouped patches, and its scores (mIoU).

A grouping model (SegCLIP, ``vlmray.models.segclip``) assigns each of the N patches of an image
to one of K centres and embeds every centre in the image-text space. Segmentation then needs no
decoder (Luo et al., 2023, Sec. 3.4):

    class(k)  = argmax_c  e_k . t_c              centre k's best-matching class prompt
    label(n)  = class(argmax_k A[n, k])          each patch takes its centre's class
    pixels    = nearest upsampling of the (grid_h, grid_w) patch labels

with t_0 the embedding of a background prompt and t_1..t_C the class embeddings (templates
averaged as zero-shot classification does). Scores accumulate one confusion matrix over the
whole set (rows = truth, columns = prediction):

    IoU_c = M_cc / (sum_j M_cj + sum_i M_ic - M_cc)
    seg_miou     = mean IoU_c over classes present in the truth or the prediction
    seg_miou_fg  = the same mean over foreground classes only (c >= 1)
    seg_pixel_acc = trace(M) / sum(M)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKGROUND = 0
"""Label of background pixels; foreground classes are 1..C (dataset label + 1)."""


def patch_labels(assign: Tensor, centre_embeds: Tensor, class_embeds: Tensor) -> Tensor:
    """Each patch's class through its centre.

    assign (B, N, K) patch-to-centre weights (soft or one-hot); centre_embeds (B, K, D) and
    class_embeds (C + 1, D) normalised, row 0 = background. Returns int64 (B, N) in [0, C].
    """
    centre_class = (centre_embeds @ class_embeds.T).argmax(-1)             # (B, K)
    centre_of = assign.argmax(-1)                                           # (B, N)
    return centre_class.gather(1, centre_of)                                # (B, N)


def upsample_labels(labels: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Patch labels (B, grid_h * grid_w), row-major -> pixel labels (B, size, size), nearest."""
    b = labels.shape[0]
    maps = labels.view(b, 1, *grid).float()                                 # (B, 1, gh, gw)
    return F.interpolate(maps, size=(size, size), mode="nearest")[:, 0].long()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """int64 (num_classes, num_classes) counts: [i, j] = pixels of true class i predicted j.
    ``pred`` and ``target`` are integer maps of one shape with values in [0, num_classes)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    flat = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """seg_miou, seg_miou_fg and seg_pixel_acc of a confusion matrix (see the module
    docstring); classes absent from both truth and prediction are left out of the means, and
    seg_miou_fg is left out when no foreground class is present at all."""
    m = confusion.double()
    inter = m.diag()                                                        # (C,)
    union = m.sum(0) + m.sum(1) - inter                                     # (C,)
    present = union > 0
    iou = inter / union.clamp(min=1.0)
    out = {"seg_pixel_acc": (inter.sum() / m.sum().clamp(min=1.0)).item(),
           "seg_miou": iou[present].mean().item() if present.any() else 0.0}
    fg = present.clone()
    fg[BACKGROUND] = False
    if fg.any():
        out["seg_miou_fg"] = iou[fg].mean().item()
    return out


__all__ = ["BACKGROUND", "confusion_matrix", "patch_labels", "segmentation_scores",
           "upsample_labels"]
