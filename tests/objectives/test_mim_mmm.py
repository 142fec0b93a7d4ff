"""``mim`` (MAE / FLAVA MIM) and ``mmm`` (FLAVA's masked multimodal modelling): losses and
gradients against float64 references written from the equations, the patch masks (exact count,
reproducible from (seed, step), shared through ``ObjectiveMix.prepare``, independent of the
number of workers), config and setup errors, and 1 process vs 2 gloo processes for ``mmm``
(global masked-token count) and the masks.

    pytest tests/objectives/test_mim_mmm.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models.mae import random_patch_mask
from vlmray.models.outputs import MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS, Outputs
from vlmray.objectives import ObjectiveMix, build_objective, list_objectives
from vlmray.objectives.base import SetupContext
from vlmray.objectives.generative.mmm import MmmLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, D, P, GRID, L, VOCAB = 4, 8, 4, (2, 3), 6, 11
N = GRID[0] * GRID[1]
S_H, S_W = GRID[0] * P, GRID[1] * P


def ctx(grid: tuple[int, int, int] | None = (*GRID, P)) -> SetupContext:
    return SetupContext(model=nn.Identity(), embed_dim=D, text_width=D, vocab_size=VOCAB,
                        image_size=S_W, patch_grid=grid)


def build(name: str, **params: Any) -> Any:
    torch.manual_seed(1)
    obj = build_objective(ObjectiveSpec(name=name, params=params))
    obj.setup(ctx())
    return obj.double()


def pixels(n: int = B, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S_H, S_W), generator=g, dtype=torch.uint8)


def target_patch(px: Tensor, i: int, n: int, norm: bool) -> Tensor:
    """Patch n of image i in float64, laid out (row, column, channel), optionally normalised
    by its own mean and unbiased variance (MAE's norm_pix_loss)."""
    r, c = divmod(n, GRID[1])
    t = px[i, :, r * P:(r + 1) * P, c * P:(c + 1) * P].permute(1, 2, 0).reshape(-1).double() / 255
    if norm:
        mean = t.sum() / t.numel()
        var = ((t - mean) ** 2).sum() / (t.numel() - 1)
        t = (t - mean) / torch.sqrt(var + 1e-6)
    return t


def reference_mim(pred: Tensor, px: Tensor, mask: Tensor, norm: bool) -> Tensor:
    """1/(B K) sum_i sum_{n masked} 1/P' sum_k (pred - x)^2, one patch at a time."""
    terms = [((pred[i, n] - target_patch(px, i, n, norm)) ** 2).mean()
             for i in range(mask.shape[0]) for n in range(N) if bool(mask[i, n])]
    return torch.stack(terms).sum() / len(terms)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_matches_reference(norm_pix: bool) -> None:
    obj = build("mim", mask_ratio=0.5, decoder_layers=1, decoder_heads=2, norm_pix=norm_pix)
    px = pixels()
    mask = random_patch_mask(B, N, 0.5, torch.Generator().manual_seed(0))
    vis = torch.randn(B, N // 2, D, dtype=torch.float64, requires_grad=True)
    out = Outputs(extra={MASKED_IMAGE_TOKENS: vis})
    result = obj({schema.PIXELS: px, schema.PATCH_MASK: mask}, out, Dist())
    want = reference_mim(obj.decoder(vis, mask), px, mask, norm_pix)
    torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
    wrt = (vis, *obj.parameters())
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert result.metrics["mask_ratio"] == pytest.approx(0.5)
    assert int(obj.step) == 1 and "step" in obj.state_dict()


def test_prepare_masks_exact_reproducible_and_advancing() -> None:
    obj = build("mim", mask_ratio=0.75, seed=3)
    batch = {schema.PIXELS: pixels(8)}
    first = obj.prepare(batch)[schema.PATCH_MASK]
    assert first.dtype == torch.bool and first.shape == (8, N)
    assert (first.sum(1) == round(0.75 * N)).all()
    assert torch.equal(build("mim", mask_ratio=0.75, seed=3).prepare(batch)[schema.PATCH_MASK],
                       first)
    assert not torch.equal(build("mim", mask_ratio=0.75, seed=4).prepare(batch)[schema.PATCH_MASK],
                           first)
    assert torch.equal(obj.prepare(batch)[schema.PATCH_MASK], first)      # step unchanged
    obj.advance()
    assert not torch.equal(obj.prepare(batch)[schema.PATCH_MASK], first)
    restored = build("mim", mask_ratio=0.75, seed=3)
    restored.load_state_dict(obj.state_dict())                            # step is saved
    assert torch.equal(restored.prepare(batch)[schema.PATCH_MASK],
                       obj.prepare(batch)[schema.PATCH_MASK])
    assert obj.prepare({**batch, schema.PATCH_MASK: first}) == {}         # never replaced


def test_mix_shares_the_first_objectives_mask() -> None:
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="mim", params={"mask_ratio": 0.5}),
                                   ObjectiveSpec(name="mmm", params={"mask_ratio": 0.25,
                                                                     "seed": 7})])
    mix.setup(ctx())
    batch = mix.prepare({schema.PIXELS: pixels()})
    mim_mask = mix.objectives["mim"].prepare({schema.PIXELS: pixels()})[schema.PATCH_MASK]
    assert torch.equal(batch[schema.PATCH_MASK], mim_mask)
    assert (batch[schema.PATCH_MASK].sum(1) == 3).all()
    assert {schema.PATCH_MASK, schema.PIXELS, MASKED_IMAGE_TOKENS} <= mix.needs


def test_config_and_setup_errors() -> None:
    assert {"mim", "mmm"} <= set(list_objectives())
    for name in ("mim", "mmm"):
        with pytest.raises(ValueError, match="mask_ratio"):
            build_objective(ObjectiveSpec(name=name, params={"mask_ratio": 1.0}))
        obj = build_objective(ObjectiveSpec(name=name))
        with pytest.raises(ValueError, match=f"{name} needs a ViT vision tower"):
            obj.setup(ctx(grid=None))
        with pytest.raises(ValueError, match="call setup"):
            obj.prepare({schema.PIXELS: pixels()})
        tiny = build_objective(ObjectiveSpec(name=name, params={"mask_ratio": 0.05}))
        with pytest.raises(ValueError, match="at least one"):
            tiny.setup(ctx())                                             # round(0.3) = 0
    with pytest.raises(ValueError, match="mlm_weight"):
        build_objective(ObjectiveSpec(name="mmm", params={"mlm_weight": -1.0}))
    obj = build("mim")
    with pytest.raises(ValueError, match="masked_image_tokens"):
        obj({schema.PIXELS: pixels()}, Outputs(), Dist())
    with pytest.raises(ValueError, match="masked_text_tokens.*mlm_prob"):
        build("mmm")({schema.PIXELS: pixels(), schema.PATCH_MASK: torch.zeros(B, N).bool()},
                     Outputs(extra={MASKED_IMAGE_TOKENS: torch.zeros(B, N, D)}), Dist())


# --- mmm ----------------------------------------------------------------------------------------


def mmm_inputs(n: int = B, seed: int = 0) -> dict[str, Tensor]:
    """Pixels, a patch mask, visible tokens, masked-caption states, labels and token mask
    with varied lengths and varied numbers of masked tokens per row (some rows none)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 2, 4, 5, 3, L, 1, 4])[:n]
    token_mask = torch.arange(L) < lengths[:, None]
    chosen = (torch.rand(n, L, generator=g) < 0.4) & token_mask
    chosen[0, 1] = True
    labels = torch.where(chosen, torch.randint(0, VOCAB, (n, L), generator=g), -100)
    mask = random_patch_mask(n, N, 0.5, g)
    return {schema.PIXELS: pixels(n, seed), schema.PATCH_MASK: mask,
            schema.MLM_LABELS: labels, schema.TOKEN_MASK: token_mask.long(),
            "vis": torch.randn(n, N // 2, D, generator=g, dtype=torch.float64),
            "text": torch.randn(n, L, D, generator=g, dtype=torch.float64)}


def reference_mmm(obj: MmmLoss, vis: Tensor, text: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Each row alone through the encoder with its padding cut off; MLM: sum of CE over all
    masked tokens / their count; MIM: the float64 patch reference; weighted sum."""
    labels, mask, px = batch[schema.MLM_LABELS], batch[schema.PATCH_MASK], batch[schema.PIXELS]
    ce, count, preds = [], 0, []
    for i in range(vis.shape[0]):
        length = int(batch[schema.TOKEN_MASK][i].sum())
        _, h_img, h_txt = obj.encoder(vis[i:i + 1], text[i:i + 1, :length])
        preds.append(obj.decoder(h_img, mask[i:i + 1])[0])
        for pos in range(length):
            if int(labels[i, pos]) != -100:
                logits = obj.mlm_head(h_txt[0, pos])
                ce.append(-logits.log_softmax(0)[labels[i, pos]])
                count += 1
    l_mlm = torch.stack(ce).sum() / count
    l_mim = reference_mim(torch.stack(preds), px, mask, obj.cfg.norm_pix)
    return obj.cfg.mlm_weight * l_mlm + obj.cfg.mim_weight * l_mim


def test_mmm_matches_reference() -> None:
    obj = build("mmm", layers=1, heads=2, decoder_layers=1, mlm_weight=0.7, mim_weight=1.3)
    batch = mmm_inputs()
    vis = batch.pop("vis").requires_grad_()
    text = batch.pop("text").requires_grad_()
    out = Outputs(extra={MASKED_IMAGE_TOKENS: vis, MASKED_TEXT_TOKENS: text})
    result = obj(batch, out, Dist())
    want = reference_mmm(obj, vis, text, batch)
    torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
    wrt = (vis, text, *obj.parameters())
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(want, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert set(result.metrics) == {"mlm", "mim", "mlm_acc", "masked_tokens"}
    assert result.metrics["masked_tokens"] == (batch[schema.MLM_LABELS] != -100).sum()


# --- 1 process vs 2 gloo processes --------------------------------------------------------------

W, NB = 2, 8


class TinyTowers(nn.Module):
    """Linear maps from fixed features to the masked token states (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(D, D, dtype=torch.float64)
        self.text = nn.Linear(D, D, dtype=torch.float64)

    def forward(self, vis: Tensor, text: Tensor) -> Outputs:
        return Outputs(extra={MASKED_IMAGE_TOKENS: self.image(vis),
                              MASKED_TEXT_TOKENS: self.text(text)})


def _loss_and_grads(towers_state: dict, obj_state: dict, batch: dict[str, Tensor],
                    dist: Dist) -> tuple[float, dict[str, Tensor], Tensor]:
    towers, obj = TinyTowers(), build("mmm", layers=1, heads=2, decoder_layers=1)
    towers.load_state_dict(towers_state)
    obj.load_state_dict(obj_state)
    batch = dict(batch)
    vis, text = batch.pop("vis"), batch.pop("text")
    prepared = obj.prepare({schema.PIXELS: batch[schema.PIXELS]})[schema.PATCH_MASK]
    loss = obj(batch, towers(vis, text), dist).loss
    loss.backward()
    params = [(f"towers.{k}", p) for k, p in towers.named_parameters()]
    params += [(f"mmm.{k}", p) for k, p in obj.named_parameters()]
    return loss.item(), {k: p.grad for k, p in params}, prepared


def _worker(rank: int, world_size: int, towers_state: dict, obj_state: dict,
            batch: dict[str, Tensor]) -> tuple[float, dict[str, Tensor], Tensor]:
    dist = Dist.current()
    rows = slice(rank * NB // world_size, (rank + 1) * NB // world_size)
    loss, grads, prepared = _loss_and_grads(towers_state, obj_state,
                                            {k: v[rows] for k, v in batch.items()}, dist)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return dist.all_reduce_mean(loss).item(), grads, prepared


def test_mmm_two_processes_match_one() -> None:
    torch.manual_seed(0)
    setup = (TinyTowers().state_dict(),
             build("mmm", layers=1, heads=2, decoder_layers=1).state_dict(),
             mmm_inputs(NB, seed=5))
    labels = setup[2][schema.MLM_LABELS]
    counts = [(labels[:4] != -100).sum().item(), (labels[4:] != -100).sum().item()]
    assert counts[0] != counts[1]            # a per-rank mean would weight tokens unequally
    results = run_gloo(_worker, W, *setup)
    loss, grads, prepared = _loss_and_grads(*setup, Dist())
    # the masks prepare draws do not depend on the number of workers
    torch.testing.assert_close(torch.cat([r[2] for r in results]), prepared, rtol=0, atol=0)
    for dist_loss, dist_grads, _ in results:
        assert dist_loss == pytest.approx(loss, abs=1e-10)
        assert dist_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)
