"""pool_regions: area-overlap pooling of patch tokens against a float64 per-cell reference
(box-cell intersection areas computed geometrically), exact cases, empty boxes, gradients.

    pytest tests/models/test_regions.py -q
"""

from __future__ import annotations

import pytest
import torch

from vlmray.models.regions import axis_overlap, pool_regions


def reference_pool(tokens: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor,
                   n_prefix: int) -> torch.Tensor:
    """Per box, per cell: intersection area of the box with the cell rectangle divided by the
    cell area; weighted mean of the cell tokens (zeros when the box covers nothing)."""
    gh, gw = grid
    b, k, _ = boxes.shape
    out = torch.zeros(b, k, tokens.shape[-1], dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            x0, y0, x1, y1 = boxes[i, j].tolist()
            total, acc = 0.0, torch.zeros(tokens.shape[-1], dtype=torch.float64)
            for r in range(gh):
                for c in range(gw):
                    w = max(0.0, min(x1, (c + 1) / gw) - max(x0, c / gw))
                    h = max(0.0, min(y1, (r + 1) / gh) - max(y0, r / gh))
                    a = w * h * gw * gh
                    acc = acc + a * tokens[i, n_prefix + r * gw + c]
                    total += a
            if total > 0:
                out[i, j] = acc / total
    return out


def test_matches_reference_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    grid, prefix, d = (3, 4), 1, 5
    tokens = torch.randn(2, prefix + 12, d, generator=g, dtype=torch.float64, requires_grad=True)
    lo = torch.rand(2, 3, 2, generator=g, dtype=torch.float64) * 0.6
    boxes = torch.cat((lo, lo + 0.05 + 0.4 * torch.rand(2, 3, 2, generator=g,
                                                        dtype=torch.float64)), -1)
    got = pool_regions(tokens, grid, boxes, prefix)
    want = reference_pool(tokens, grid, boxes, prefix)
    assert got.shape == (2, 3, d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    gw = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad((got * gw).sum(), tokens)
    (b,) = torch.autograd.grad((want * gw).sum(), tokens)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert a[:, 0].abs().max() == 0          # the CLS prefix never contributes
    assert pool_regions(tokens, grid, boxes).shape == (2, 3, d)   # n_prefix = N - gh * gw


def test_exact_cases_and_empty_boxes() -> None:
    tokens = torch.arange(2 * 2 * 3, dtype=torch.float64).reshape(1, 4, 3)   # 2x2 grid, no CLS
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5],     # exactly cell (0, 0)
                           [0.5, 0.5, 1.0, 1.0],     # exactly cell (1, 1)
                           [0.0, 0.0, 1.0, 1.0],     # the whole image: plain mean
                           [0.25, 0.0, 0.75, 0.5],   # half of cells (0, 0) and (0, 1)
                           [0.3, 0.3, 0.3, 0.8]]],   # zero width: zeros
                         dtype=torch.float64)
    got = pool_regions(tokens, (2, 2), boxes, 0)[0]
    torch.testing.assert_close(got[0], tokens[0, 0])
    torch.testing.assert_close(got[1], tokens[0, 3])
    torch.testing.assert_close(got[2], tokens[0].mean(0))
    torch.testing.assert_close(got[3], (tokens[0, 0] + tokens[0, 1]) / 2)
    assert got[4].abs().max() == 0
    tokens.requires_grad_()
    pool_regions(tokens, (2, 2), boxes[:, 4:], 0).sum().backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().max() == 0


def test_axis_overlap_and_shape_errors() -> None:
    lo, hi = torch.tensor([0.1]), torch.tensor([0.6])
    torch.testing.assert_close(axis_overlap(lo, hi, 4), torch.tensor([[0.6, 1.0, 0.4, 0.0]]))
    with pytest.raises(ValueError, match="patch grid"):
        pool_regions(torch.zeros(1, 5, 2), (2, 3), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="boxes must be"):
        pool_regions(torch.zeros(1, 5, 2), (2, 2), torch.zeros(1, 4))
