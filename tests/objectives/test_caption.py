"""CaptionLoss (CoCa captioning): the loss against a float64 per-row reference (loss + grads),
PAD ignored, config and setup errors, and a tiny loop that learns to caption.

    pytest tests/objectives/test_caption.py -q
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
from vlmray.objectives.generative.caption import CaptionLoss

B, N, D, V, L = 4, 5, 16, 20, 7


def _objective(**params: Any) -> CaptionLoss:
    torch.manual_seed(0)
    spec = ObjectiveSpec(name="caption", params={"unimodal_layers": 1, "multimodal_layers": 1,
                                                 "heads": 2, "n_queries": 3, **params})
    obj = build_objective(spec)
    obj.setup(SetupContext(model=nn.Identity(), embed_dim=D, text_width=0, vocab_size=V))
    return obj.double()


def _batch(seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Captions of lengths 3..L (one truncated, no EOS); image tokens (B, N, D)."""
    return caption_batch([3, 5, L, 4], L, V, (B, N, D), seed)


def reference_loss(obj: CaptionLoss, ids: Tensor, mask: Tensor, img: Tensor) -> Tensor:
    """Each row decoded alone at its real length; -log p(y_{t+1} | y_<=t) summed, / #targets."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        row = ids[i, :n][None]
        logits = obj.decoder(row, None, obj.pooler(img[i:i + 1]))[0]          # (n, V)
        for t in range(n - 1):
            total = total - logits[t].log_softmax(-1)[row[0, t + 1]]
            count += 1
    return total / count


def test_registry_needs_and_config_errors() -> None:
    assert "caption" in list_objectives() and CaptionLoss.needs == {"image_tokens"}
    for bad in ({"multimodal_layers": 0}, {"n_queries": 0}, {"beam_size": 0},
                {"eval_samples": 0}, {"max_len": 1}, {"unimodal_layers": -1}):
        with pytest.raises(ValueError, match="caption"):
            build_objective(ObjectiveSpec(name="caption", params=bad))
    with pytest.raises(ValueError, match="valid params"):
        build_objective(ObjectiveSpec(name="caption", params={"layers": 2}))
    with pytest.raises(ValueError, match="call setup"):
        CaptionLoss()(_batch()[0], Outputs(image_tokens=_batch()[1]), Dist())
    with pytest.raises(ValueError, match="divisible"):
        CaptionLoss(CaptionLoss.Config(heads=3)).setup(
            SetupContext(model=nn.Identity(), embed_dim=D, text_width=0, vocab_size=V))


def test_loss_matches_float64_reference_with_grads() -> None:
    obj = _objective()
    batch, img = _batch()
    result = obj(batch, Outputs(image_tokens=img), Dist())
    want = reference_loss(obj, batch[schema.TOKENS], batch[schema.TOKEN_MASK], img)
    torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
    n_targets = int(batch[schema.TOKEN_MASK][:, 1:].sum())
    assert result.metrics["tokens"] == n_targets == 2 + 4 + 6 + 3
    assert 0.0 <= result.metrics["token_acc"] <= 1.0
    wrt = (img, *obj.parameters())
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_pad_positions_ignored() -> None:
    obj = _objective()
    batch, img = _batch(seed=3)
    loss = obj(batch, Outputs(image_tokens=img), Dist()).loss
    noisy = dict(batch)
    noisy[schema.TOKENS] = torch.where(batch[schema.TOKEN_MASK].bool(), batch[schema.TOKENS], 9)
    torch.testing.assert_close(obj(noisy, Outputs(image_tokens=img), Dist()).loss, loss,
                               rtol=0, atol=1e-12)
    # the same ids counted as real change the loss: the mask is what excludes them
    ones = dict(noisy, **{schema.TOKEN_MASK: torch.ones_like(batch[schema.TOKEN_MASK])})
    assert abs(obj(ones, Outputs(image_tokens=img), Dist()).loss.item() - loss.item()) > 1e-6


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_loop_learns_image_dependent_captions() -> None:
    """Two images, two captions: after training, greedy decoding reproduces each caption."""
    obj = _objective(multimodal_layers=2)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    batch = {schema.TOKENS: ids, schema.TOKEN_MASK: (ids != 0).long()}
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = obj(batch, Outputs(image_tokens=img), Dist()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    got = obj.decoder.generate(obj.pooler(img), max_len=6, bos_id=1, eos_id=2, pad_id=0)
    assert got.tolist() == ids.tolist()
