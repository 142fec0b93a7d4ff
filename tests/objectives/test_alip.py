"""AlipLoss: config checks, the gates, the loss and gradients against a float64 reference
written from the paper's equations (EMAs evolving over 3 steps), 1 process vs 2 gloo processes
(loss, gradients and EMA buffers), gates off == plain bi-path CLIP, the model extra that
encodes synthetic captions, and the gates on REAL built-in data (MiniLM sentence embeddings of
raw texts vs oracle captions: mismatched rows are down-weighted).

    pytest tests/objectives/test_alip.py -q
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import build_model
from vlmray.models.outputs import SYNTHETIC_TEXT_EMBEDS, Outputs
from vlmray.objectives import build_objective, list_objectives
from vlmray.objectives.contrastive.alip import AlipLoss, gate_weights
from vlmray.objectives.contrastive.clip import ClipLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, W, D, FI, FT = 8, 2, 6, 5, 7


class TinyTriple(nn.Module):
    """Linear image encoder and ONE linear text encoder for raw texts and captions (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(FI, D, dtype=torch.float64)
        self.text = nn.Linear(FT, D, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.2, dtype=torch.float64))

    def forward(self, pixels: Tensor, texts: Tensor, captions: Tensor) -> Outputs:
        out = Outputs(image_embeds=F.normalize(self.image(pixels), dim=-1),
                      text_embeds=F.normalize(self.text(texts), dim=-1),
                      logit_scale=self.log_scale.exp())
        out.extra[SYNTHETIC_TEXT_EMBEDS] = F.normalize(self.text(captions), dim=-1)
        return out


def _inputs(step: int) -> tuple[Tensor, Tensor, Tensor]:
    """pixels (N, FI), texts (N, FT), captions (N, FT): captions near their texts for half the
    rows (consistent), unrelated for the rest (so the LCG gates some rows and not others)."""
    g = torch.Generator().manual_seed(100 + step)
    pixels = torch.randn(N, FI, generator=g, dtype=torch.float64)
    texts = torch.randn(N, FT, generator=g, dtype=torch.float64)
    captions = torch.randn(N, FT, generator=g, dtype=torch.float64)
    captions[::2] = texts[::2] + 0.1 * captions[::2]
    return pixels, texts, captions


def _objective(**params: Any) -> AlipLoss:
    return build_objective(ObjectiveSpec(name="alip", params=params)).double()


PARAMS = {"init": 0.3, "momentum": 0.5, "gamma": 2.0}   # EMAs that move, rows on both sides


def reference_step(x: Tensor, t: Tensor, c: Tensor, s: Tensor, emas: list[float],
                   gamma: float, m: float) -> tuple[Tensor, list[float]]:
    """The paper's equations one row at a time: EMAs first, then LCG/DCG weights, then the
    weighted bi-path InfoNCE averaged over the N rows (m = 0: E = this batch's mean)."""
    n = x.shape[0]

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum()

    sims = [[float(dot(a[i], b[i]).detach()) for i in range(n)]
            for a, b in ((t, c), (x, t), (x, c))]
    emas = [m * e + (1 - m) * sum(s_k) / n for e, s_k in zip(emas, sims)]

    def ce(a: Tensor, b: Tensor, i: int) -> Tensor:
        logits = torch.stack([s * dot(a[i], b[j]) for j in range(n)])
        return -(logits[i] - torch.logsumexp(logits, 0))

    total = x.new_zeros(())
    for i in range(n):
        w_s = min(math.exp(gamma * (sims[0][i] - emas[0])), 1.0)
        w_t = math.exp(gamma * (sims[1][i] - emas[1])) if w_s < 1 else 1.0
        w_c = math.exp(gamma * (sims[2][i] - emas[2])) if w_s < 1 else 1.0
        total = total + w_s * w_t * (ce(x, t, i) + ce(t, x, i)) / 2
        total = total + w_s * w_c * (ce(x, c, i) + ce(c, x, i)) / 2
    return total / n, emas


def test_registry_config_and_buffers() -> None:
    assert "alip" in list_objectives()
    assert AlipLoss.needs == {"image_embeds", "text_embeds", "logit_scale", SYNTHETIC_TEXT_EMBEDS}
    obj = _objective()
    assert (obj.cfg.gamma, obj.cfg.momentum, obj.cfg.init, obj.cfg.gates) == (2.0, 0.99, 1.0,
                                                                              True)
    assert {"ema_tc", "ema_xt", "ema_xc"} <= set(obj.state_dict())
    assert float(obj.ema_tc) == 1.0
    for bad, match in (({"gamma": -1.0}, "gamma"), ({"momentum": 1.0}, "momentum"),
                       ({"init": 2.0}, "init")):
        with pytest.raises(ValueError, match=match):
            build_objective(ObjectiveSpec(name="alip", params=bad))
    out = TinyTriple()(*_inputs(0))
    del out.extra[SYNTHETIC_TEXT_EMBEDS]
    with pytest.raises(ValueError, match="extra_texts"):
        obj({}, out, Dist())


def test_gate_weights_follow_the_definitions() -> None:
    s_tc = torch.tensor([0.9, 0.2, 0.5, 0.1], dtype=torch.float64)
    s_xt = torch.tensor([0.1, 0.8, 0.3, -0.2], dtype=torch.float64)
    s_xc = torch.tensor([0.2, 0.1, 0.9, 0.4], dtype=torch.float64)
    e = torch.tensor(0.4, dtype=torch.float64)
    w_s, w_t, w_c = gate_weights(s_tc, s_xt, s_xc, e, e, e, 2.0)
    # rows 0 and 2 agree with their caption above the running mean: W^s = 1, DCG off
    torch.testing.assert_close(w_s, torch.tensor([1.0, math.exp(-0.4), 1.0, math.exp(-0.6)],
                                                 dtype=torch.float64))
    torch.testing.assert_close(w_t, torch.tensor([1.0, math.exp(0.8), 1.0, math.exp(-1.2)],
                                                 dtype=torch.float64))
    torch.testing.assert_close(w_c, torch.tensor([1.0, math.exp(-0.6), 1.0, 1.0],
                                                 dtype=torch.float64))
    assert w_t[1] > 1.0                      # DCG weights are not clipped


@pytest.mark.parametrize("from_batch", [False, True])
def test_loss_grads_and_emas_match_reference_over_three_steps(from_batch: bool) -> None:
    torch.manual_seed(0)
    model, obj = TinyTriple(), _objective(**PARAMS, init_from_batch=from_batch)
    ref_model = TinyTriple()
    ref_model.load_state_dict(model.state_dict())
    emas = [PARAMS["init"]] * 3
    for step in range(3):
        m = 0.0 if from_batch and step == 0 else PARAMS["momentum"]
        inputs = _inputs(step)
        result = obj({}, model(*inputs), Dist())
        out = ref_model(*inputs)
        want, emas = reference_step(out.image_embeds, out.text_embeds,
                                    out.extra[SYNTHETIC_TEXT_EMBEDS], out.logit_scale, emas,
                                    PARAMS["gamma"], m)
        torch.testing.assert_close(result.loss, want, rtol=1e-10, atol=1e-12)
        got_grads = torch.autograd.grad(result.loss, list(model.parameters()))
        want_grads = torch.autograd.grad(want, list(ref_model.parameters()))
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        got_emas = [float(obj.ema_tc), float(obj.ema_xt), float(obj.ema_xc)]
        assert got_emas == pytest.approx(emas, abs=1e-12)
        assert 0.0 < result.metrics["gated_frac"] < 1.0, result.metrics   # both kinds of rows
        assert result.metrics["ema_tc"] == pytest.approx(emas[0], abs=1e-12)
    assert obj.ema_tc.item() != PARAMS["init"] and int(obj.ema_updates) == 3


def test_eval_mode_freezes_emas() -> None:
    obj = _objective(**PARAMS).eval()
    obj({}, TinyTriple()(*_inputs(0)), Dist())
    assert float(obj.ema_xt) == PARAMS["init"]


def test_gates_off_is_plain_bipath_clip() -> None:
    torch.manual_seed(0)
    out = TinyTriple()(*_inputs(1))
    got = _objective(gates=False, init=0.0)({}, out, Dist())
    clip = ClipLoss()
    caption_out = Outputs(image_embeds=out.image_embeds,
                          text_embeds=out.extra[SYNTHETIC_TEXT_EMBEDS],
                          logit_scale=out.logit_scale)
    want = clip({}, out, Dist()).loss + clip({}, caption_out, Dist()).loss
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=1e-12)
    assert got.metrics["w_s"] == got.metrics["w_t"] == got.metrics["w_c"] == 1.0
    # with the gates on the same batch the loss differs (the weights are not all 1)
    on = _objective(init=0.0)({}, out, Dist())
    assert abs(on.loss.item() - want.item()) > 1e-3


# --- 1 process vs 2 gloo processes --------------------------------------------------------------


def _run(state: dict, rows: slice, dist: Dist) -> tuple[list[float], dict[str, Tensor],
                                                        list[float]]:
    """Two steps on ``rows`` of each step's batch; returns (losses, grads of both steps summed,
    EMAs after)."""
    model, obj = TinyTriple(), _objective(**PARAMS)
    model.load_state_dict(state)
    losses = []
    for step in range(2):
        pixels, texts, captions = (v[rows] for v in _inputs(step))
        loss = obj({}, model(pixels, texts, captions), dist).loss
        loss.backward()
        losses.append(loss.item())
    grads = {k: p.grad for k, p in model.named_parameters()}
    return losses, grads, [float(obj.ema_tc), float(obj.ema_xt), float(obj.ema_xc)]


def _worker(rank: int, world_size: int, state: dict) -> tuple[list[float], dict, list[float]]:
    dist = Dist.current()
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    losses, grads, emas = _run(state, rows, dist)
    for grad in grads.values():                  # DDP's average
        torch.distributed.all_reduce(grad)
        grad /= world_size
    return [dist.all_reduce_mean(v).item() for v in losses], grads, emas


def test_two_processes_match_one() -> None:
    torch.manual_seed(0)
    state = TinyTriple().state_dict()
    losses, grads, emas = _run(state, slice(0, N), Dist())
    for dist_losses, dist_grads, dist_emas in run_gloo(_worker, W, state):
        assert dist_losses == pytest.approx(losses, abs=1e-10)
        assert dist_emas == pytest.approx(emas, abs=1e-12)       # every rank: global EMAs
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=1e-10, rtol=0, msg=name)


# --- the model encodes synthetic captions -------------------------------------------------------


def test_dual_encoder_encodes_synthetic_tokens() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1,
                                     "num_heads": 2, "mlp_ratio": 2.0},
                      text={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 64}, embed_dim=16)
    model = build_model(cfg, image_size=32, vocab_size=64, context_length=8).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=g)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    batch = {schema.PIXELS: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             schema.TOKENS: ids, schema.TOKEN_MASK: mask,
             schema.SYNTHETIC_TOKENS: ids.flip(1), schema.SYNTHETIC_TOKEN_MASK: mask}
    with torch.no_grad():
        out = model(batch, AlipLoss.needs)
        want = model.encode_text(ids.flip(1), mask)[0]
    torch.testing.assert_close(out.extra[SYNTHETIC_TEXT_EMBEDS], want)
    del batch[schema.SYNTHETIC_TOKENS]
    with pytest.raises(ValueError, match="synthetic_tokens"):
        model(batch, AlipLoss.needs)


# --- the gates on real data: MiniLM embeddings of raw texts and oracle captions -----------------


def test_gates_down_weight_mismatched_pairs_on_builtin_data() -> None:
    """Built-in train rows, half with mismatched captions (sidecar noise == "mismatch"); the
    oracle describes each true scene; MiniLM embeds both. The LCG must give mismatched rows a
    much smaller W^s than clean ones."""
    from vlmray.config.data import SyntheticConfig
    from vlmray.data.synthetic import make_sample
    from vlmray.embedders import resolve_minilm
    from vlmray.rewrite.captioners import oracle_caption

    syn = SyntheticConfig(num_train=64, num_eval=8)
    samples = [make_sample(syn, "train", i, "mismatch" if i % 2 else "") for i in range(32)]
    mismatched = np.array([json.loads(s[schema.META])["noise"] == "mismatch" for s in samples])
    captions = [oracle_caption(s[schema.META], s[schema.KEY]) for s in samples]
    assert all(captions) and mismatched.sum() == 16
    embedder = resolve_minilm().load("cpu")
    with torch.no_grad():
        emb = embedder.embed_texts([s[schema.TEXT] for s in samples] + captions)
    emb = F.normalize(torch.from_numpy(emb).double(), dim=-1)
    t, c = emb[:32], emb[32:]
    x = c.clone()            # no image encoder here: only the text-caption gate is measured
    obj = _objective()       # the paper's gamma = 2, m = 0.99, E = 1 at the start
    w_s = torch.cat([obj.weights(x[i:i + 8], t[i:i + 8], c[i:i + 8])["w_s"]
                     for i in range(0, 32, 8)])                   # 4 steps of B = 8
    clean, noisy = w_s[~torch.from_numpy(mismatched)], w_s[torch.from_numpy(mismatched)]
    print(f"mean W^s clean {clean.mean():.3f} mismatched {noisy.mean():.3f}; "
          f"E^tc {float(obj.ema_tc):.4f}")
    assert noisy.mean() < 0.75 * clean.mean()
    assert (noisy.median() < clean.min()) or (noisy.max() < clean.median())
