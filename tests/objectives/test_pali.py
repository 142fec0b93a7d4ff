"""PaliLoss (PaLI split-captioning): word counts, split points (bounds, uniformity,
reproducibility, independence of the worker count), the split itself, the loss against a
float64 per-row reference (loss + grads), PAD ignored, config errors.

    pytest tests/objectives/test_pali.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.objectives._captions import caption_batch
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives
from vlmray.objectives.base import SetupContext
from vlmray.objectives.generative.pali import PaliLoss, split_caption, split_points, word_counts

B, N, D, V, L = 4, 3, 16, 20, 8


def _objective(**params: Any) -> PaliLoss:
    torch.manual_seed(0)
    spec = ObjectiveSpec(name="pali", params={"encoder_layers": 1, "decoder_layers": 1,
                                              "heads": 2, **params})
    obj = build_objective(spec)
    obj.setup(SetupContext(model=nn.Identity(), embed_dim=D, text_width=0, vocab_size=V))
    return obj.double()


def _batch(seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Captions of lengths 3, 6, L (truncated: no EOS), 7; image tokens (B, N, D)."""
    return caption_batch([3, 6, L, 7], L, V, (B, N, D), seed)


def test_registry_and_config_errors() -> None:
    assert "pali" in list_objectives() and PaliLoss.needs == {"image_tokens"}
    for bad in ({"split_frac": 1.5}, {"split_frac": -0.1}, {"encoder_layers": 0},
                {"decoder_layers": 0}, {"seed": -1}, {"beam_size": 0}, {"eval_samples": 0}):
        with pytest.raises(ValueError, match="pali"):
            build_objective(ObjectiveSpec(name="pali", params=bad))
    with pytest.raises(ValueError, match="valid params"):
        build_objective(ObjectiveSpec(name="pali", params={"frac": 0.5}))
    with pytest.raises(ValueError, match="call setup"):
        PaliLoss()(_batch()[0], Outputs(image_tokens=_batch()[1]), Dist())


def test_word_counts_and_split_caption_by_hand() -> None:
    batch, _ = _batch()
    ids, mask = batch[schema.TOKENS], batch[schema.TOKEN_MASK]
    assert word_counts(ids, mask).tolist() == [1, 4, L - 1, 5]
    s = torch.tensor([0, 2, 3, 5])
    prefix, pmask, target, tmask = split_caption(ids, mask, s)
    assert prefix.shape == (B, 5) and target.shape == (B, 5)   # max(n - s) = 8 - 3
    for i in range(B):
        n, si = int(mask[i].sum()), int(s[i])
        assert prefix[i, :si].tolist() == ids[i, 1:1 + si].tolist()
        assert pmask[i].tolist() == [1] * si + [0] * (5 - si)
        want = [1] + ids[i, 1 + si:n].tolist()
        assert target[i, :len(want)].tolist() == want
        assert tmask[i].tolist() == [1] * len(want) + [0] * (target.shape[1] - len(want))
        assert (prefix[i, si:] == 0).all() and (target[i, len(want):] == 0).all()


def test_split_points_bounds_uniform_reproducible() -> None:
    k = torch.arange(0, 12).repeat(500)                                      # (6000,)
    u = torch.rand(k.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for frac in (0.0, 0.5, 1.0):
        s = split_points(k, frac, u)
        hi = torch.floor(frac * k.double()).long()
        assert (s >= 0).all() and (s <= hi).all()
        assert (s[k == 11] == hi[k == 11]).any()                             # the top is reached
    s = split_points(torch.full((6000,), 6), 0.5, u)                         # U{0, 1, 2, 3}
    freq = torch.bincount(s, minlength=4).double() / 6000
    torch.testing.assert_close(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03,
                               rtol=0)
    obj, k = _objective(), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    same = obj.draw_splits(k, 5, Dist())
    torch.testing.assert_close(_objective().draw_splits(k, 5, Dist()), same, rtol=0, atol=0)
    assert not torch.equal(obj.draw_splits(k, 6, Dist()), same)               # step changes it
    assert not torch.equal(_objective(seed=1).draw_splits(k, 5, Dist()), same)
    # two workers holding halves of the batch draw the one-worker split points
    halves = [obj.draw_splits(k[r * 32:(r + 1) * 32], 5, Dist(rank=r, world_size=2))
              for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), same, rtol=0, atol=0)


def reference_loss(obj: PaliLoss, ids: Tensor, mask: Tensor, s: Tensor, img: Tensor) -> Tensor:
    """Row by row without padding: encode [image; w_1..w_s], decode [BOS w_{s+1}.. EOS],
    -log p of each next target token summed, divided by the number of targets."""
    model = obj.encdec
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(ids.shape[0]):
        n, si = int(mask[i].sum()), int(s[i])
        prefix = ids[i, 1:1 + si][None]
        memory, _ = model.encode(img[i:i + 1], prefix, torch.ones_like(prefix))
        target = torch.cat((ids[i, :1], ids[i, 1 + si:n]))[None]
        logits = model.decoder(target, None, memory)[0]
        for t in range(target.shape[1] - 1):
            total = total - logits[t].log_softmax(-1)[target[0, t + 1]]
            count += 1
    return total / count


def test_loss_matches_float64_reference_with_grads() -> None:
    obj = _objective(split_frac=1.0, seed=3)
    batch, img = _batch(seed=2)
    result = obj(batch, Outputs(image_tokens=img), Dist())
    s = obj.last_split
    assert int(obj.step) == 1 and s.shape == (B,)
    ids, mask = batch[schema.TOKENS], batch[schema.TOKEN_MASK]
    assert (s <= word_counts(ids, mask)).all() and s.max() > 0
    want = reference_loss(obj, ids, mask, s, img)
    torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
    assert result.metrics["tokens"] == float(mask.sum() - B - s.sum())
    wrt = (img, *obj.parameters())
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_pad_positions_ignored() -> None:
    batch, img = _batch(seed=4)
    loss = _objective()(batch, Outputs(image_tokens=img), Dist()).loss
    noisy = dict(batch)
    noisy[schema.TOKENS] = torch.where(batch[schema.TOKEN_MASK].bool(), batch[schema.TOKENS], 9)
    again = _objective()(noisy, Outputs(image_tokens=img), Dist()).loss   # same step 0 splits
    torch.testing.assert_close(again, loss, rtol=0, atol=1e-12)
