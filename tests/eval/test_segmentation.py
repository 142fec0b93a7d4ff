"""Segmentation scores on hand-made maps, against a float64 plain reference and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmray.eval.segmentation import (
    confusion_matrix,
    patch_labels,
    segmentation_scores,
    upsample_labels,
)

TRUTH = torch.tensor([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [0, 2, 2, 0],
                      [0, 0, 0, 0]])
PRED = torch.tensor([[0, 0, 1, 0],
                     [0, 1, 1, 1],
                     [0, 2, 0, 0],
                     [0, 0, 0, 3]])


def _reference(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-class IoU from pixel sets; means over classes in the truth or the prediction."""
    ious = {}
    for c in sorted(set(pred.ravel()) | set(truth.ravel())):
        p, t = pred == c, truth == c
        ious[c] = float((p & t).sum()) / float((p | t).sum())
    fg = [v for c, v in ious.items() if c != 0]
    out = {"seg_miou": float(np.mean(list(ious.values()))),
           "seg_pixel_acc": float((pred == truth).mean())}
    if fg:
        out["seg_miou_fg"] = float(np.mean(fg))
    return out


def test_scores_by_hand() -> None:
    """bg: 8 shared of 12 in the union -> 2/3; class 1: 3 of 5 -> 3/5; class 2: 1 of 2 -> 1/2;
    class 3 is only predicted -> 0; class 4 is absent everywhere and left out."""
    scores = segmentation_scores(confusion_matrix(PRED, TRUTH, 5))
    fg = [3 / 5, 1 / 2, 0.0]
    assert scores["seg_miou"] == pytest.approx((2 / 3 + sum(fg)) / 4)
    assert scores["seg_miou_fg"] == pytest.approx(sum(fg) / 3)
    assert scores["seg_pixel_acc"] == pytest.approx(12 / 16)
    assert scores == pytest.approx(_reference(PRED.numpy(), TRUTH.numpy()))


def test_confusion_accumulates_over_images() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 6, (3, 8, 8), generator=gen)
    truth = torch.randint(0, 4, (3, 8, 8), generator=gen)
    m = confusion_matrix(pred, truth, 6)
    assert m.sum() == 3 * 64 and m[2, 5] == ((truth == 2) & (pred == 5)).sum()
    assert torch.equal(m, sum(confusion_matrix(p, t, 6) for p, t in zip(pred, truth)))
    assert segmentation_scores(m) == pytest.approx(_reference(pred.numpy(), truth.numpy()))


def test_all_background_prediction() -> None:
    """IoU_bg = background fraction, every foreground class 0."""
    scores = segmentation_scores(confusion_matrix(torch.zeros_like(TRUTH), TRUTH, 3))
    assert scores["seg_miou"] == pytest.approx((10 / 16) / 3)
    assert scores["seg_miou_fg"] == 0.0 and scores["seg_pixel_acc"] == pytest.approx(10 / 16)


def test_perfect_and_background_only_maps() -> None:
    assert segmentation_scores(confusion_matrix(TRUTH, TRUTH, 3)) == pytest.approx(
        {"seg_miou": 1.0, "seg_miou_fg": 1.0, "seg_pixel_acc": 1.0})
    empty = torch.zeros(4, 4, dtype=torch.long)
    assert segmentation_scores(confusion_matrix(empty, empty, 3)) == {
        "seg_miou": 1.0, "seg_pixel_acc": 1.0}                  # no foreground: no fg mean


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(PRED, TRUTH, 3)                           # PRED has class 3
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(PRED[:2], TRUTH, 5)


def test_patch_labels_follow_their_centre() -> None:
    """Centre 0 looks like class 2, centre 1 like the background; patches take their centre's
    class whatever their own features."""
    classes = torch.eye(3)                                         # rows: bg, class 1, class 2
    centres = torch.tensor([[[0.0, 0.1, 0.9], [0.8, 0.2, 0.0]]])   # (1, K=2, D=3)
    assign = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]])  # (1, N=3, K=2)
    assert patch_labels(assign, centres, classes).tolist() == [[2, 0, 2]]


def test_upsample_is_nearest_and_row_major() -> None:
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])                    # grid 2 x 3
    up = upsample_labels(labels, (2, 3), 6)
    assert up.shape == (1, 6, 6)
    expected = torch.tensor([[1, 2, 3], [4, 5, 6]]).repeat_interleave(3, 0)
    assert torch.equal(up[0], expected.repeat_interleave(2, 1))
