"""RegionWordLoss: the loss and gradients against a float64 per-region reference written from
the equations, 1 process vs 2 gloo processes with unequal valid counts per worker (one worker
with none), an all-invalid batch (zero loss, zero but present gradients), config checks.

    pytest tests/objectives/test_regionword.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlmray.objectives.alignment.regionword  # noqa: F401  (registers "regionword")
from tests.distributed._spawn import run_gloo
from tests.models.test_regions import reference_pool
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives
from vlmray.objectives.alignment.regionword import RegionWordLoss, multi_positive_ce
from vlmray.objectives.base import SetupContext

N, W, D, K, L = 6, 2, 8, 3, 7
GRID = (2, 2)


class TinyTokens(nn.Module):
    """Linear token encoders (float64): pixels (n, 1 + 4, 5) -> image tokens with a CLS prefix
    and a 2x2 patch grid; tokens (n, L, 6) -> text tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, D, dtype=torch.float64)
        self.text = nn.Linear(6, D, dtype=torch.float64)

    def forward(self, pixels: Tensor, tokens: Tensor) -> Outputs:
        return Outputs(image_tokens=self.image(pixels), text_tokens=self.text(tokens),
                       text_mask=torch.ones(tokens.shape[:2], dtype=torch.bool))


def _objective(**params: Any) -> RegionWordLoss:
    torch.manual_seed(1)
    obj = build_objective(ObjectiveSpec(name="regionword", params=params))
    obj.setup(SetupContext(model=nn.Identity(), embed_dim=D, text_width=0, vocab_size=0,
                           patch_grid=(*GRID, 8)))
    obj = obj.double()
    if isinstance(obj.head, nn.Linear):   # move the head off the identity so it matters
        with torch.no_grad():
            obj.head.weight.add_(0.3 * torch.randn(D, D, dtype=torch.float64))
    return obj


def _inputs(valid_rows: list[int], seed: int = 0) -> dict[str, Tensor]:
    """pixels, tokens and region columns for N rows; row i has valid_rows[i] valid boxes. Rows
    0 and 3 name two phrases (different spans), the others one phrase shared by their boxes."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(N, K, 2, generator=g, dtype=torch.float64) * 0.5
    boxes = torch.cat((lo, lo + 0.1 + 0.4 * torch.rand(N, K, 2, generator=g,
                                                       dtype=torch.float64)), -1)
    spans = torch.zeros(N, K, L, dtype=torch.long)
    mask = torch.zeros(N, K, dtype=torch.long)
    for i, n_valid in enumerate(valid_rows):
        mask[i, :n_valid] = 1
        spans[i, :, 1 + i % 3: 3 + i % 3] = 1
        if i in (0, 3):
            spans[i, 1] = 0
            spans[i, 1, 5] = 1
    return {"pixels": torch.randn(N, 5, 5, generator=g, dtype=torch.float64),
            "tokens": torch.randn(N, L, 6, generator=g, dtype=torch.float64),
            schema.REGION_BOXES: boxes.float(), schema.REGION_SPANS: spans,
            schema.REGION_MASK: mask}


def reference_loss(obj: RegionWordLoss, out: Outputs, batch: dict[str, Tensor]) -> Tensor:
    """L = 1/(2|V|) sum_a (l^{r->p}_a + l^{p->r}_a), one valid region at a time."""
    pooled = reference_pool(out.image_tokens, GRID, batch[schema.REGION_BOXES].double(), 1)
    spans, mask = batch[schema.REGION_SPANS], batch[schema.REGION_MASK]
    valid = [(i, k) for i in range(N) for k in range(K) if mask[i, k]]
    r = {a: F.normalize(obj.head(pooled[a]), dim=0) for a in valid}
    p = {}
    for i, k in valid:
        words = [t for t in range(L) if spans[i, k, t]]
        p[i, k] = F.normalize(out.text_tokens[i, words].mean(0), dim=0)
    s = obj.log_scale.exp()
    total = torch.zeros((), dtype=torch.float64)
    for a in valid:
        positives = [b for b in valid if b[0] == a[0] and torch.equal(spans[b], spans[a])]
        for x, y in ((r, p), (p, r)):
            num = torch.logsumexp(torch.stack([s * x[a] @ y[b] for b in positives]), 0)
            den = torch.logsumexp(torch.stack([s * x[a] @ y[b] for b in valid]), 0)
            total = total + den - num
    return total / (2 * max(len(valid), 1))


def test_registry_config_and_setup_errors() -> None:
    assert "regionword" in list_objectives()
    assert {"image_tokens", "text_tokens", schema.REGION_SPANS} <= RegionWordLoss.needs
    assert _objective(region_head=False).head.__class__ is nn.Identity
    with pytest.raises(ValueError, match="init_temperature"):
        RegionWordLoss.Config(init_temperature=0.0)
    with pytest.raises(ValueError, match="max_scale"):
        RegionWordLoss.Config(init_temperature=0.07, max_scale=5.0)
    with pytest.raises(ValueError, match="ViT"):
        RegionWordLoss().setup(SetupContext(model=nn.Identity(), embed_dim=D, text_width=0,
                                            vocab_size=0))
    batch = _inputs([1] * N)
    out = TinyTokens()(batch["pixels"], batch["tokens"])
    with pytest.raises(ValueError, match="data.regions"):
        _objective()({}, out, Dist())


def test_multi_positive_ce_merges_duplicates() -> None:
    """-log of the positives' total probability; invalid columns and rows without positives
    drop out; duplicated positives far above the rest give ~0 (no log|P| floor)."""
    logits = torch.tensor([[2.0, 2.0, 0.5, -1.0, 9.0]], dtype=torch.float64)
    pos = torch.tensor([[True, True, False, False, False]])
    cols = torch.tensor([True, True, True, True, False])
    e = logits[0, :4].exp()
    want = -torch.log((e[0] + e[1]) / e.sum())
    torch.testing.assert_close(multi_positive_ce(logits, pos, cols)[0], want)
    assert multi_positive_ce(logits, torch.zeros_like(pos), cols).item() == 0.0
    far = torch.tensor([[40.0, 40.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert multi_positive_ce(far, pos, cols).item() < 1e-12


@pytest.mark.parametrize("region_head", [True, False])
def test_loss_and_grads_match_reference(region_head: bool) -> None:
    batch = _inputs([3, 2, 0, 1, 3, 2], seed=2)
    model, obj = TinyTokens(), _objective(region_head=region_head)
    got = obj(batch, model(batch["pixels"], batch["tokens"]), Dist())
    want = reference_loss(obj, model(batch["pixels"], batch["tokens"]), batch)
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)
    assert 0.0 <= got.metrics["acc"] <= 1.0
    assert got.metrics["valid_frac"] == pytest.approx(11 / (N * K))
    wrt = [*model.parameters(), *obj.parameters()]
    for a, b in zip(torch.autograd.grad(got.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_empty_valid_batch_is_zero_and_connected() -> None:
    batch = _inputs([0] * N)
    model, obj = TinyTokens(), _objective()
    result = obj(batch, model(batch["pixels"], batch["tokens"]), Dist())
    assert result.loss.item() == 0.0 and result.loss.requires_grad
    result.loss.backward()
    for p in [*model.parameters(), *obj.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() == 0


# --- 1 process vs 2 gloo processes --------------------------------------------------------------



def _loss_and_grads(state: dict, obj_state: dict, batch: dict[str, Tensor],
                    dist: Dist) -> tuple[float, dict[str, Tensor]]:
    model, obj = TinyTokens(), _objective()
    model.load_state_dict(state)
    obj.load_state_dict(obj_state)
    loss = obj(batch, model(batch["pixels"], batch["tokens"]), dist).loss
    loss.backward()
    params = [(f"model.{k}", p) for k, p in model.named_parameters()]
    params += [(f"regionword.{k}", p) for k, p in obj.named_parameters()]
    return loss.item(), {k: p.grad for k, p in params}


def _worker(rank: int, world_size: int, state: dict, obj_state: dict,
            batch: dict[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
    """Each rank: its N/W rows, its loss, backward; then the trainer's average of both."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    loss, grads = _loss_and_grads(state, obj_state, {k: v[rows] for k, v in batch.items()},
                                  dist)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads


@pytest.mark.parametrize("valid", [[3, 2, 3, 0, 0, 1],    # rank 0: 8 valid regions, rank 1: 1
                                   [0, 0, 0, 2, 3, 1]])   # rank 0: none at all
def test_two_processes_match_one_with_unequal_valid_counts(valid: list[int]) -> None:
    torch.manual_seed(0)
    setup = (TinyTokens().state_dict(), _objective().state_dict(), _inputs(valid, seed=4))
    results = run_gloo(_worker, W, *setup)
    loss, grads = _loss_and_grads(*setup, Dist())
    assert math.isfinite(loss) and loss > 0
    for dist_loss, dist_grads in results:
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        assert dist_grads.keys() == grads.keys() and len(grads) == 7   # 4 + s + head
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)
