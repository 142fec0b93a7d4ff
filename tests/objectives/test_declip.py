"""DeCLIP's MVS (``declip_mv``), ISS (``simsiam``) and TSS (``mlm``): plain references written
from the equations (float64, loss and gradients), 1 vs 2 gloo processes, and the recipe.

    pytest tests/objectives/test_declip.py -q
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.distributed._spawn import run_gloo
from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, MLM_STATES, TEXT_VIEW_EMBEDS, Outputs
from vlmray.objectives import SetupContext, build_objective, validate_spec
from vlmray.objectives.contrastive.simsiam import SimSiamLoss
from vlmray.objectives.generative.mlm import MLMLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, W, D, V, C, L, VOCAB = 8, 2, 6, 2, 5, 7, 11


def unit(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def ctx() -> SetupContext:
    return SetupContext(model=nn.Identity(), embed_dim=D, text_width=C, vocab_size=VOCAB)


def built(name: str, **params: Any) -> Any:
    """The objective, set up for D, C, VOCAB, in float64 (heads seeded)."""
    torch.manual_seed(0)
    obj = build_objective(ObjectiveSpec(name=name, params=params))
    obj.setup(ctx())
    return obj.double()


# --- declip_mv ---------------------------------------------------------------------------------


def reference_clip(u: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """1/(2N) sum_i [-log softmax_j(s u_i.v_j)[i] - log softmax_j(s v_i.u_j)[i]], written out."""
    logits = s * u @ v.T
    i2t = logits.diagonal() - logits.logsumexp(dim=1)
    t2i = logits.diagonal() - logits.logsumexp(dim=0)
    return -(i2t + t2i).mean() / 2


def reference_mv(image: Tensor, image_views: Tensor, text: Tensor, text_views: Tensor,
                 s: Tensor, iv: int, tv: int) -> Tensor:
    """1/4 sum over (u, u~) x (v, v~) of L_CLIP."""
    images, texts = (image, image_views[:, iv]), (text, text_views[:, tv])
    return sum(reference_clip(u, v, s) for u in images for v in texts) / 4


def mv_outputs(image: Tensor, image_views: Tensor, text: Tensor, text_views: Tensor,
               s: Tensor) -> Outputs:
    return Outputs(image_embeds=image, text_embeds=text, logit_scale=s,
                   extra={IMAGE_VIEW_EMBEDS: image_views, TEXT_VIEW_EMBEDS: text_views})


@pytest.mark.parametrize("gather", ["local", "global"])
def test_mv_matches_reference(gather: str) -> None:
    inputs = [unit(N, D, seed=1), unit(N, V, D, seed=2), unit(N, D, seed=3),
              unit(N, V, D, seed=4), torch.tensor(4.0, dtype=torch.float64)]
    inputs = [x.requires_grad_() for x in inputs]
    loss_fn = build_objective(ObjectiveSpec(name="declip_mv", params={
        "image_view": 1, "text_view": 1, "gather": gather}))
    result = loss_fn({}, mv_outputs(*inputs), Dist())
    torch.testing.assert_close(result.loss, expected := reference_mv(*inputs, 1, 1))
    grads = torch.autograd.grad(result.loss, inputs)
    for a, b in zip(grads, torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b)
    assert grads[1][:, 0].abs().max() == 0 < grads[1][:, 1].abs().max()   # only view 1 used
    pairs = [result.metrics[f"loss_{p}"] for p in ("it", "iT", "It", "IT")]
    assert sum(pairs) / 4 == pytest.approx(result.loss.item())
    assert pairs[0] == pytest.approx(reference_clip(inputs[0], inputs[2], inputs[4]).item())


def test_mv_names_the_missing_view() -> None:
    image, text, s = unit(N, D, seed=1), unit(N, D, seed=2), torch.tensor(1.0)
    loss_fn = build_objective(ObjectiveSpec(name="declip_mv"))
    out = Outputs(image_embeds=image, text_embeds=text, logit_scale=s,
                  extra={IMAGE_VIEW_EMBEDS: unit(N, 1, D, seed=3)})
    with pytest.raises(ValueError, match="text_view_embeds.*data.views.text"):
        loss_fn({}, out, Dist())
    far = build_objective(ObjectiveSpec(name="declip_mv", params={"image_view": 1}))
    out.extra[TEXT_VIEW_EMBEDS] = unit(N, 1, D, seed=4)
    with pytest.raises(ValueError, match="view 1 of 'image_view_embeds'.*1 view"):
        far({}, out, Dist())


# --- simsiam -----------------------------------------------------------------------------------


def reference_mlp(layers: nn.Module, x: Tensor) -> Tensor:
    """Linear / BatchNorm (training mode: this batch's mean and biased variance) / ReLU, by hand."""
    for layer in layers.children():
        if isinstance(layer, nn.Linear):
            x = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)
        elif isinstance(layer, nn.BatchNorm1d):
            mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
            x = (x - mean) / torch.sqrt(var + layer.eps)
            if layer.affine:
                x = x * layer.weight + layer.bias
        elif isinstance(layer, nn.ReLU):
            x = x.clamp(min=0)
        else:
            raise AssertionError(f"unexpected layer {layer}")
    return x


def reference_simsiam(obj: SimSiamLoss, e1: Tensor, e2: Tensor) -> Tensor:
    """1/2 [D(p1, sg(z2)) + D(p2, sg(z1))], D(p, z) = -mean_i p_i.z_i / (|p_i| |z_i|)."""
    def g(x: Tensor) -> Tensor:
        return x if isinstance(obj.projector, nn.Identity) else reference_mlp(obj.projector, x)

    def dist(p: Tensor, z: Tensor) -> Tensor:
        return -((p * z).sum(-1) / (p.norm(dim=-1) * z.norm(dim=-1))).mean()

    z1, z2 = g(e1), g(e2)
    p1, p2 = reference_mlp(obj.predictor, z1), reference_mlp(obj.predictor, z2)
    return (dist(p1, z2.detach()) + dist(p2, z1.detach())) / 2


@pytest.mark.parametrize("projector", [False, True])
def test_simsiam_matches_reference(projector: bool) -> None:
    obj = built("simsiam", view=1, projector=projector)
    e1, views = unit(N, D, seed=1).requires_grad_(), unit(N, V, D, seed=2).requires_grad_()
    out = Outputs(image_embeds=e1, extra={IMAGE_VIEW_EMBEDS: views})
    result = obj({}, out, Dist())
    expected = reference_simsiam(obj, e1, views[:, 1])
    torch.testing.assert_close(result.loss, expected)
    wrt = [e1, views, *obj.parameters()]
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, b)
    assert obj.predictor[0].out_features == max(1, D // 4)
    assert 0 < result.metrics["z_std"] < 1 and -1 <= result.metrics["views_cos"] <= 1


def test_simsiam_batchnorm_statistics_are_per_batch() -> None:
    """What a W-worker run computes: each worker's BN sees only its rows, so the loss is the
    mean of the per-half losses, which differs from the loss on the whole batch."""
    obj = built("simsiam")
    e1, e2 = unit(N, D, seed=1), unit(N, 1, D, seed=2)
    whole = obj({}, Outputs(image_embeds=e1, extra={IMAGE_VIEW_EMBEDS: e2}), Dist()).loss
    halves = [obj({}, Outputs(image_embeds=e1[r], extra={IMAGE_VIEW_EMBEDS: e2[r]}), Dist()).loss
              for r in (slice(0, N // 2), slice(N // 2, N))]
    assert abs(whole.item() - sum(h.item() for h in halves) / 2) > 1e-4
    obj.eval()                                                      # running stats: per-sample
    whole = obj({}, Outputs(image_embeds=e1, extra={IMAGE_VIEW_EMBEDS: e2}), Dist()).loss
    halves = [obj({}, Outputs(image_embeds=e1[r], extra={IMAGE_VIEW_EMBEDS: e2[r]}), Dist()).loss
              for r in (slice(0, N // 2), slice(N // 2, N))]
    assert whole.item() == pytest.approx(sum(h.item() for h in halves) / 2)


# --- mlm ---------------------------------------------------------------------------------------


def mlm_labels(seed: int, rows: int = N, prob: float = 0.4) -> Tensor:
    """(rows, L) int64: a token id where masked (probability ``prob``), else -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, L), generator=g)
    return torch.where(torch.rand(rows, L, generator=g) < prob, ids, torch.full_like(ids, -100))


def reference_mlm(head: nn.Module, states: Tensor, labels: Tensor) -> Tensor:
    """-1/M sum over masked (i, l) of log softmax(f(h_il))[y_il], written out."""
    total, count = states.new_zeros(()), 0
    for i, pos in zip(*torch.nonzero(labels != -100, as_tuple=True)):
        logits = head(states[i, pos])
        total = total - (logits[labels[i, pos]] - logits.logsumexp(dim=0))
        count += 1
    return total / count


def test_mlm_matches_reference() -> None:
    obj = built("mlm")
    states, labels = unit(N, L, C, seed=1).requires_grad_(), mlm_labels(seed=2)
    result = obj({schema.MLM_LABELS: labels}, Outputs(extra={MLM_STATES: states}), Dist())
    torch.testing.assert_close(result.loss, expected := reference_mlm(obj.head, states, labels))
    wrt = [states, *obj.parameters()]
    for a, b in zip(torch.autograd.grad(result.loss, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, b)
    assert result.metrics["masked_tokens"] == int((labels != -100).sum())
    assert [type(m) for m in obj.head] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Linear]
    assert obj.head[-1].out_features == VOCAB


def test_mlm_without_masked_tokens_is_zero_and_connected() -> None:
    states, labels = unit(N, L, C, seed=1).requires_grad_(), torch.full((N, L), -100)
    result = built("mlm")({schema.MLM_LABELS: labels}, Outputs(extra={MLM_STATES: states}), Dist())
    assert result.loss.item() == 0.0
    result.loss.backward()
    assert torch.equal(states.grad, torch.zeros_like(states))


def test_mlm_names_what_is_missing() -> None:
    obj = built("mlm")
    with pytest.raises(ValueError, match="mlm_states.*mlm_prob"):
        obj({schema.MLM_LABELS: mlm_labels(seed=0)}, Outputs(), Dist())
    with pytest.raises(ValueError, match="column 'mlm_labels'"):
        obj({}, Outputs(extra={MLM_STATES: unit(N, L, C, seed=1)}), Dist())


# --- contract: setup, needs, registry ----------------------------------------------------------


def test_heads_need_setup_and_size_from_the_context() -> None:
    for name in ("simsiam", "mlm"):
        with pytest.raises(ValueError, match="call setup"):
            build_objective(ObjectiveSpec(name=name))({}, Outputs(), Dist())
    with pytest.raises(ValueError, match="text tower"):
        MLMLoss().setup(SetupContext(model=nn.Identity(), embed_dim=D, text_width=0,
                                     vocab_size=VOCAB))
    sim = SimSiamLoss(SimSiamLoss.Config(hidden=3))
    sim.setup(ctx())
    assert [p.shape for p in sim.predictor.parameters()][0] == (3, D)


def test_needs_are_exactly_what_each_reads() -> None:
    needs = {s: build_objective(ObjectiveSpec(name=s)).needs
             for s in ("declip_mv", "simsiam", "mlm")}
    assert needs["declip_mv"] == {"image_embeds", "text_embeds", "logit_scale",
                                  IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS}
    assert needs["simsiam"] == {"image_embeds", IMAGE_VIEW_EMBEDS}
    assert needs["mlm"] == {MLM_STATES, schema.MLM_LABELS}


def test_registry_and_param_validation() -> None:
    with pytest.raises(UnknownNameError, match="'local', 'global', 'local_nograd'"):
        validate_spec(ObjectiveSpec(name="declip_mv", params={"gather": "ring"}))
    with pytest.raises(ValueError, match="text_view must be >= 0"):
        validate_spec(ObjectiveSpec(name="declip_mv", params={"text_view": -1}))
    with pytest.raises(ValueError, match="expects bool"):
        validate_spec(ObjectiveSpec(name="simsiam", params={"projector": 1}))
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        validate_spec(ObjectiveSpec(name="simsiam", params={"hidden": -2}))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        validate_spec(ObjectiveSpec(name="mlm", params={"label_smoothing": 1.0}))
    with pytest.raises(UnknownNameError, match="did you mean 'view'"):
        validate_spec(ObjectiveSpec(name="simsiam", params={"veiw": 0}))


# --- 1 process vs 2 gloo processes -------------------------------------------------------------


class Tiny(nn.Module):
    """Linear image/text encoders for the views and a tanh text tower for MLM states, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(5, D, dtype=torch.float64)
        self.text = nn.Linear(4, D, dtype=torch.float64)
        self.states = nn.Linear(3, C, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, data: dict[str, Tensor]) -> Outputs:
        return Outputs(
            image_embeds=F.normalize(self.image(data["pixels"]), dim=-1),       # (B, D)
            text_embeds=F.normalize(self.text(data["tokens"]), dim=-1),         # (B, D)
            logit_scale=self.log_scale.exp(),
            extra={IMAGE_VIEW_EMBEDS: F.normalize(self.image(data["pixel_views"]), dim=-1),
                   TEXT_VIEW_EMBEDS: F.normalize(self.text(data["token_views"]), dim=-1),
                   MLM_STATES: torch.tanh(self.states(data["mlm_inputs"]))})   # (B, L, C)


def _global_data() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Model weights (with both heads) and a global batch; rank 0's rows mask ~4x more tokens."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = {"pixels": torch.randn(N, 5, generator=g, dtype=torch.float64),
            "pixel_views": torch.randn(N, V, 5, generator=g, dtype=torch.float64),
            "tokens": torch.randn(N, 4, generator=g, dtype=torch.float64),
            "token_views": torch.randn(N, V, 4, generator=g, dtype=torch.float64),
            "mlm_inputs": torch.randn(N, L, 3, generator=g, dtype=torch.float64),
            "labels": torch.cat([mlm_labels(1, N // 2, prob=0.8), mlm_labels(2, N // 2, 0.2)])}
    state = {f"model.{k}": v for k, v in Tiny().state_dict().items()}
    state.update({f"mlm.{k}": v for k, v in built("mlm").state_dict().items()})
    return state, data


MODES: list[tuple[str, dict[str, Any]]] = [
    ("declip_mv", {"gather": "local", "image_view": 1}),
    ("declip_mv", {"gather": "global", "text_view": 1}),
    ("mlm", {}),
]


def _step(state: dict[str, Tensor], data: dict[str, Tensor], name: str, params: dict[str, Any],
          dist: Dist) -> tuple[float, dict[str, Tensor]]:
    """One step: the rank-mean loss and the DDP-averaged gradients of model + objective."""
    model = Tiny()
    loss_fn = built(name, **params)
    both = nn.ModuleDict({"model": model, "mlm": loss_fn if name == "mlm" else nn.Module()})
    both.load_state_dict(state, strict=name == "mlm")
    loss = loss_fn({schema.MLM_LABELS: data["labels"]}, model(data), dist).loss
    loss.backward()
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in both.named_parameters()}
    if dist.world_size > 1:
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= dist.world_size
    return dist.all_reduce_mean(loss).item(), grads


def _worker(rank: int, world_size: int, state: dict[str, Tensor],
            data: dict[str, Tensor]) -> list[Any]:
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    local = {k: v[rows] for k, v in data.items()}
    masked = int((local["labels"] != -100).sum())
    return [(masked, *_step(state, local, name, params, Dist.current())) for name, params in MODES]


@pytest.fixture(scope="module")
def two_process() -> list[list[Any]]:
    return run_gloo(_worker, W, *_global_data())


@pytest.mark.parametrize("i", range(len(MODES)), ids=[f"{n}-{p.get('gather', '')}"
                                                      for n, p in MODES])
def test_two_processes_match_one(two_process: list[list[Any]], i: int) -> None:
    """Loss and DDP-averaged gradients of W=2 workers with half the batch each equal one process
    on the full batch (MLM: with unequal masked-token counts on the two ranks)."""
    name, params = MODES[i]
    loss, grads = _step(*_global_data(), name, params, Dist())
    used = ("mlm.", "model.states") if name == "mlm" else ("model.image", "model.text",
                                                          "model.log_scale")
    assert all(g.abs().max() > 0 for k, g in grads.items() if k.startswith(used))
    counts = [rank_result[i][0] for rank_result in two_process]
    if name == "mlm":
        assert counts[0] > 2 * counts[1] > 0                        # unequal on purpose
        halves = [{k: v[r] for k, v in _global_data()[1].items()}
                  for r in (slice(0, N // 2), slice(N // 2, N))]     # 1 process: local means
        naive = sum(_step(_global_data()[0], h, name, params, Dist())[0] for h in halves) / 2
        assert abs(naive - loss) > 1e-3                             # so the test has teeth
    for masked, dist_loss, dist_grads in (rank_result[i] for rank_result in two_process):
        assert dist_loss == pytest.approx(loss, abs=1e-9)
        for key, grad in grads.items():
            torch.testing.assert_close(dist_grads[key], grad, atol=1e-9, rtol=0, msg=key)


# --- the recipe, with the view columns built by hand -------------------------------------------


def view_batch(cfg: Any, mask_id: int, rows: int = 8) -> dict[str, Tensor]:
    """The columns the views stage adds (one global crop, one EDA text, MLM), made by hand."""
    g = torch.Generator().manual_seed(0)
    s, length = cfg.data.image_size, cfg.data.context_length
    pixels = torch.randint(0, 256, (rows, 3, s, s), generator=g, dtype=torch.uint8)
    rng = torch.arange(rows) % 4                                    # labels
    tokens = torch.randint(5, cfg.data.vocab_size, (rows, length), generator=g)
    masked = torch.rand(rows, length, generator=g) < 0.15
    masked[:, 1] = True                                             # at least one per row
    return {schema.PIXELS: pixels, schema.TOKENS: tokens,
            schema.TOKEN_MASK: torch.ones(rows, length, dtype=torch.long), schema.LABEL: rng,
            schema.PIXELS_VIEWS: pixels.flip(-1)[:, None],          # (B, 1, 3, S, S)
            schema.TOKENS_VIEWS: tokens.roll(1, dims=1)[:, None],    # (B, 1, L)
            schema.TOKEN_MASK_VIEWS: torch.ones(rows, 1, length, dtype=torch.long),
            schema.MLM_TOKENS: torch.where(masked, mask_id, tokens),
            schema.MLM_LABELS: torch.where(masked, tokens, -100)}


def test_declip_tiny_trains_with_hand_built_view_columns() -> None:
    from vlmray.data.ingest import tokenizer_for
    from vlmray.recipes import recipe
    from vlmray.train.loop import train_step
    from vlmray.train.state import build_state
    from vlmray.validate import validate

    cfg = validate(recipe("declip_tiny", **{
        "data.image_size": "32", "data.context_length": "16", "data.vocab_size": "1024",
        "model.embed_dim": "32", "train.device": "cpu", "train.warmup_steps": "0",
        "train.lr": "5e-4", "train.batch_size": "8"}))
    assert cfg.data.views.image == ["global"] and cfg.data.views.text == ["eda"]
    state = build_state(cfg, device=torch.device("cpu"))
    assert set(state.mix.objectives) == {"declip_mv", "simsiam", "mlm", "declip_nns"}
    assert {IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS, MLM_STATES} <= state.mix.needs
    batch = view_batch(cfg, tokenizer_for(cfg.data).mask_id)
    history = [train_step(state, batch, Dist()) for _ in range(4)]
    for m in history:
        assert all(math.isfinite(v) for v in m.values()), m
        assert {"loss/declip_mv", "loss/simsiam", "loss/mlm", "loss/declip_nns"} <= set(m)
    assert history[0]["loss/mlm"] == pytest.approx(math.log(tokenizer_for(cfg.data).vocab_size),
                                                   rel=0.2)
    assert history[1]["declip_nns/queue_empty"] == 0.0              # queue filled at step 1
    assert history[-1]["loss"] < history[1]["loss"]                 # (step 0: NNS term is 0)
    assert state.mix.objectives["mlm"].head[0].weight.grad.abs().max() > 0
    assert state.mix.objectives["simsiam"].predictor[0].weight.grad.abs().max() > 0

