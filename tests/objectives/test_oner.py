"""OneRLoss: against loops over the paper's four equations (float64, loss and gradients), ITC
against CLIP, config checks, per-instance needs, and 1 process vs 2 gloo processes on the same
global batch.

    pytest tests/objectives/test_oner.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.oner import ONER_MIXED_EMBEDS, ONER_PAIRED_EMBEDS, ONER_PARTNER
from vlmray.models.outputs import Outputs
from vlmray.objectives import build_objective, list_objectives, validate_spec
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.oner import OneRLoss

N, W, D = 8, 2, 4
WEIGHTS = [dict(), dict(itc=0.5, xmc=2.0, cic=0.3, cmc=1.5, lam=0.7),
           dict(itc=0.0, xmc=1.0, cic=0.0, cmc=0.0), dict(itc=0.0, xmc=0.0, cic=0.0, cmc=1.0),
           dict(itc=0.0, xmc=0.0, cic=1.0, cmc=0.0, lam=1.0)]


def reference_oner_loss(u: Tensor, v: Tensor, m: Tensor, c: Tensor, s: Tensor,
                        partner: list[int], itc: float = 1.0, xmc: float = 1.0,
                        cic: float = 1.0, cmc: float = 1.0, lam: float = 0.5) -> Tensor:
    """w_itc ITC + w_xmc XMC + w_cic CIC + w_cmc CMC, each term a loop over its equation;
    ``partner[i]`` is the (global) row whose caption m_i carries."""
    n = len(u)

    def ce(q: Tensor, bank: Tensor, target: dict[int, float]) -> Tensor:
        """-sum_j y_j log softmax_j(s q . bank_k)."""
        logits = torch.stack([s * q @ bank[k] for k in range(n)])
        log_z = torch.logsumexp(logits, dim=0)
        return -sum(w * (logits[j] - log_z) for j, w in target.items())

    def soft(i: int) -> dict[int, float]:
        y = {i: lam}
        y[partner[i]] = y.get(partner[i], 0.0) + 1 - lam
        return y

    terms = {
        "itc": sum(ce(u[i], v, {i: 1.0}) + ce(v[i], u, {i: 1.0}) for i in range(n)) / (2 * n),
        "xmc": sum(ce(m[i], u, soft(i)) + ce(m[i], v, soft(i)) for i in range(n)) / (2 * n),
        "cic": sum(ce(c[i], u, {i: 1.0}) + ce(c[i], v, {i: 1.0}) for i in range(n)) / (2 * n),
        "cmc": sum(ce(m[i], c, soft(i)) for i in range(n)) / n,
    }
    weights = {"itc": itc, "xmc": xmc, "cic": cic, "cmc": cmc}
    return sum(weights[k] * terms[k] for k in terms)


def _embeds(seed: int, n: int = N) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    embs = [F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(4)]
    return [*(e.requires_grad_() for e in embs),
            torch.tensor(3.0, dtype=torch.float64, requires_grad=True)]


def _outputs(u: Tensor, v: Tensor, m: Tensor, c: Tensor, s: Tensor, partner: Tensor) -> Outputs:
    return Outputs(image_embeds=u, text_embeds=v, logit_scale=s,
                   extra={ONER_MIXED_EMBEDS: m, ONER_PAIRED_EMBEDS: c, ONER_PARTNER: partner})


@pytest.mark.parametrize("params", WEIGHTS)
@pytest.mark.parametrize("partner", [[1, 2, 3, 4, 5, 6, 7, 0], [3, 0, 0, 5, 4, 2, 7, 6]])
def test_single_process_matches_loop_reference(params: dict, partner: list[int]) -> None:
    u, v, m, c, s = _embeds(1)
    loss_fn = OneRLoss(OneRLoss.Config(**params))
    got = loss_fn({}, _outputs(u, v, m, c, s, torch.tensor(partner)), Dist()).loss
    want = reference_oner_loss(u, v, m, c, s, partner, **params)
    torch.testing.assert_close(got, want)
    grads_got = torch.autograd.grad(got, (u, v, m, c, s), allow_unused=True)
    grads_want = torch.autograd.grad(want, (u, v, m, c, s), allow_unused=True)
    for x, a, b in zip((u, v, m, c, s), grads_got, grads_want):
        # an inactive term's input gets no gradient (None) here; the reference's weight 0: 0
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, b)


def test_itc_term_is_clip_and_metrics() -> None:
    u, v, m, c, s = _embeds(2)
    result = OneRLoss()({}, _outputs(u, v, m, c, s, torch.arange(N).roll(-1)), Dist())
    clip = ClipLoss()({}, Outputs(image_embeds=u, text_embeds=v, logit_scale=s), Dist())
    assert result.metrics["itc"] == pytest.approx(clip.loss.item(), abs=1e-12)
    assert set(result.metrics) == {"itc", "xmc", "cic", "cmc", "acc_i2t", "acc_t2i",
                                   "logit_scale"}
    itc_only = OneRLoss(OneRLoss.Config(xmc=0.0, cic=0.0, cmc=0.0))
    only = itc_only({}, Outputs(image_embeds=u, text_embeds=v, logit_scale=s), Dist())
    torch.testing.assert_close(only.loss, clip.loss, rtol=0, atol=1e-12)


def test_soft_targets() -> None:
    loss_fn = OneRLoss(OneRLoss.Config(lam=0.75))
    labels = torch.tensor([3, 4, 5])                            # rank 1 of W = 2, B = 3
    y = loss_fn.soft_targets(labels, torch.tensor([1, 2, 0]), 6, torch.float64)
    assert y.tolist() == [[0, 0, 0, 0.75, 0.25, 0], [0, 0, 0, 0, 0.75, 0.25],
                          [0, 0, 0, 0.25, 0, 0.75]]
    self_mix = loss_fn.soft_targets(torch.tensor([0]), torch.tensor([0]), 1, torch.float64)
    assert self_mix.tolist() == [[1.0]]


def test_needs_follow_the_active_terms() -> None:
    base = {"image_embeds", "text_embeds", "logit_scale"}
    assert OneRLoss().needs == base | {ONER_MIXED_EMBEDS, ONER_PAIRED_EMBEDS}
    assert OneRLoss(OneRLoss.Config(cic=0, cmc=0)).needs == base | {ONER_MIXED_EMBEDS}
    assert OneRLoss(OneRLoss.Config(xmc=0, cmc=0)).needs == base | {ONER_PAIRED_EMBEDS}
    assert OneRLoss(OneRLoss.Config(xmc=0, cic=0, cmc=0)).needs == base
    u, v, _, _, s = _embeds(3)
    with pytest.raises(ValueError, match="oner_mixed_embeds.*model.arch='oner'"):
        OneRLoss()({}, Outputs(image_embeds=u, text_embeds=v, logit_scale=s), Dist())


def test_registry_validates_params() -> None:
    assert "oner" in list_objectives()
    loss_fn = build_objective(ObjectiveSpec(name="oner", params={"xmc": 0.5, "lam": 0.6}))
    assert isinstance(loss_fn, OneRLoss) and loss_fn.cfg.xmc == 0.5
    with pytest.raises(ValueError, match="at least one of"):
        validate_spec(ObjectiveSpec(name="oner", params=dict(itc=0, xmc=0, cic=0, cmc=0)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        validate_spec(ObjectiveSpec(name="oner", params={"cic": -1.0}))
    with pytest.raises(ValueError, match="lam must be in"):
        validate_spec(ObjectiveSpec(name="oner", params={"lam": 0.0}))
    with pytest.raises(ValueError, match="valid params"):
        validate_spec(ObjectiveSpec(name="oner", params={"gather": "global"}))


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


class TinyOneR(nn.Module):
    """One shared linear 'encoder' over [pixels; tokens] inputs, float64; mixes roll captions
    by one inside blocks of ``block`` rows (a rank's local batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_in = nn.Linear(5, 3, dtype=torch.float64)
        self.text_in = nn.Linear(6, 3, dtype=torch.float64)
        self.shared = nn.Linear(3, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, pixels: Tensor, tokens: Tensor, block: int) -> Outputs:
        x, t = self.image_in(pixels), self.text_in(tokens)            # (n, 3) each
        local = torch.arange(block).roll(-1)                          # pi within a block
        partner = (torch.arange(len(x)) // block) * block + local.repeat(len(x) // block)

        def enc(h: Tensor) -> Tensor:
            return F.normalize(self.shared(torch.tanh(h)), dim=-1)

        return _outputs(enc(x), enc(t), enc(x + t[partner]), enc(x + t), self.log_scale.exp(),
                        partner)


def _setup() -> tuple[dict[str, Tensor], Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return (TinyOneR().state_dict(), torch.randn(N, 5, generator=g, dtype=torch.float64),
            torch.randn(N, 6, generator=g, dtype=torch.float64))


def _loss_and_grads(state: dict, pixels: Tensor, tokens: Tensor, params: dict, block: int,
                    dist: Dist) -> tuple[float, dict[str, Tensor]]:
    model = TinyOneR()
    model.load_state_dict(state)
    loss_fn = build_objective(ObjectiveSpec(name="oner", params=params))
    loss = loss_fn({}, model(pixels, tokens, block), dist).loss
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}


def _worker(rank: int, world_size: int, state: dict, pixels: Tensor,
            tokens: Tensor) -> list[Any]:
    """Each rank: its N/W rows (partners rolled locally), loss, backward, then DDP's average."""
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    out = []
    for params in WEIGHTS[:2]:
        loss, grads = _loss_and_grads(state, pixels[rows], tokens[rows], params,
                                      N // world_size, dist)
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= world_size
        out.append((dist.all_reduce_mean(loss).item(), grads))
    return out


@pytest.fixture(scope="module")
def two_process() -> list[list[Any]]:
    return run_gloo(_worker, W, *_setup())


@pytest.mark.parametrize("which", [0, 1])
def test_two_processes_match_one(two_process: list[list[Any]], which: int) -> None:
    """Same loss and DDP-averaged gradients as one process on the full batch (same partners)."""
    loss, grads = _loss_and_grads(*_setup(), WEIGHTS[which], N // W, Dist())
    for res in two_process:
        dist_loss, dist_grads = res[which]
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)
