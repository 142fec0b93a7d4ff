"""NLIP's noise completion: the weighted losses against float64 references written from the
equations, concept top-k, prepare (shapes, determinism, concept refresh), the whole objective
against its equation, 1 vs 2 gloo processes, and config errors.

    pytest tests/objectives/test_nlip_completion.py -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.objectives.test_nlip import reference_loss, reference_posterior
from vlmray._registry import UnknownNameError
from vlmray.config import ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.data.tokenize import BOS, PAD, HashTokenizer
from vlmray.distributed import Dist
from vlmray.eval.heldout import HeldOut
from vlmray.models import build_model
from vlmray.models.extras import encode_view_extras
from vlmray.models.outputs import COMPLETION_EMBEDS, Outputs
from vlmray.objectives import build_objective, validate_spec
from vlmray.objectives.base import SetupContext
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.nlip_completion import (
    NlipCompletionLoss,
    concept_words,
    top_concepts,
    weighted_caption_loss,
    weighted_infonce,
)
from vlmray.objectives.mix import ObjectiveMix

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, D, V, L = 8, 8, 64, 8
F64 = torch.float64


def unit(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


def grads(loss: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# --- references written from the equations ------------------------------------------------


def reference_aux(u: Tensor, w: Tensor, s: Tensor, p: Tensor) -> Tensor:
    """L_aux = (1/N) sum_i p_i 1/2 [CE(s u_i W^T, i) + CE(s w_i U^T, i)]."""
    n = u.shape[0]
    z = s * u @ w.T                                                  # z_ij = s u_i . w_j
    total = u.new_zeros(())
    for i in range(n):
        to_w = -(z[i, i] - z[i].logsumexp(0))
        to_u = -(z[i, i] - z[:, i].logsumexp(0))
        total = total + float(p[i]) * 0.5 * (to_w + to_u)
    return total / n


def reference_caption(logits: Tensor, targets: Tensor, valid: Tensor, w: Tensor) -> Tensor:
    """L_cap = (1/B) sum_i w_i (1/T_i) sum_{t valid} -log softmax(logits_it)[y_it]."""
    total = logits.new_zeros(())
    for i in range(logits.shape[0]):
        terms = [-(logits[i, t, targets[i, t]] - logits[i, t].logsumexp(0))
                 for t in range(logits.shape[1]) if bool(valid[i, t])]
        if terms:
            total = total + float(w[i]) * torch.stack(terms).mean()
    return total / logits.shape[0]


@pytest.mark.parametrize("gather", ["local", "global"])
def test_weighted_infonce_matches_reference(gather: str) -> None:
    u, w = unit(N, D, seed=1).requires_grad_(), unit(N, D, seed=2).requires_grad_()
    s = torch.tensor(6.0, dtype=F64, requires_grad=True)
    p = torch.tensor([0.0, 1.0, 0.3, 0.0, 0.9, 0.5, 0.1, 0.7], dtype=F64)
    got = weighted_infonce(ClipLoss(ClipLoss.Config(gather=gather)), u, w, s, p, Dist())
    want = reference_aux(u, w, s, p)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, (u, w, s)), grads(want, (u, w, s))):
        torch.testing.assert_close(a, b)
    zero = weighted_infonce(ClipLoss(), u, w, s, torch.zeros(N, dtype=F64), Dist())
    assert zero.item() == 0.0                                         # no noisy row: no term


def test_weighted_caption_loss_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 11, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 11, (4, 5), generator=g)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]],
                         dtype=torch.bool)                            # row 2: nothing to learn
    weights = torch.tensor([1.0, 0.25, 0.8, 0.0], dtype=F64)
    got = weighted_caption_loss(logits, targets, valid, weights)
    want = reference_caption(logits, targets, valid, weights)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(got, (logits,))[0], grads(want, (logits,))[0])
    assert grads(weighted_caption_loss(logits, targets, valid, weights), (logits,))[0][3].abs(
    ).sum() == 0                                                      # weight 0: no gradient


def test_top_concepts_on_a_constructed_case() -> None:
    """Concepts along the axes; image i points mostly at one axis, then a second, a third."""
    concepts = torch.eye(4, dtype=F64) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=F64)[:, None]
    images = torch.tensor([[0.1, 0.9, 0.3, 0.0],                      # 1, 2, 0
                           [0.5, 0.0, 0.2, 0.8],                      # 3, 0, 2
                           [-1.0, -0.2, 0.4, 0.1]], dtype=F64)        # 2, 3, 1 (scale-free)
    got = top_concepts(images, concepts, 3)
    assert got.tolist() == [[1, 2, 0], [3, 0, 2], [2, 3, 1]]
    assert top_concepts(images * 7.0, concepts, 1).tolist() == [[1], [3], [2]]


# --- a tiny float64 model with real encoders -------------------------------------------------


class TinyModel(nn.Module):
    """Patches (2x2 of 2x2 px) -> linear image tokens; token embeddings -> masked mean text;
    ``forward`` produces what the objective needs (extras through the shared helper)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(12, D, dtype=F64)
        self.tok = nn.Embedding(V, D, dtype=F64)
        self.text_proj = nn.Linear(D, D, dtype=F64)
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=F64))
        self.dropout = nn.Dropout(0.5)              # eval mode (prepare) must switch it off

    def encode_image(self, pixels: Tensor, *, tokens: bool = False) -> tuple[Tensor, Tensor]:
        x = pixels.to(F64) / 255.0                                      # (B, 3, 4, 4)
        patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).flatten(3)
        feats = self.dropout(self.patch(patches.flatten(1, 2)))        # (B, 4, D)
        return F.normalize(feats.mean(1), dim=-1), feats

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        states = self.text_proj(self.tok(ids))                          # (B, L, D)
        m = mask[..., None].to(F64)
        return F.normalize((states * m).sum(1) / m.sum(1).clamp(min=1), dim=-1), states

    def forward(self, batch: dict[str, Tensor], needs: Any = ()) -> Outputs:
        img, img_tok = self.encode_image(batch[schema.PIXELS], tokens=True)
        txt, _ = self.encode_text(batch[schema.TOKENS], batch[schema.TOKEN_MASK])
        out = Outputs(image_embeds=img, text_embeds=txt, image_tokens=img_tok,
                      logit_scale=self.log_scale.exp())
        out.extra.update(encode_view_extras(self, batch, needs))
        return out


TOKENIZER = HashTokenizer(vocab_size=V, context_length=L)
PARAMS = {"start_step": 0, "refit_every": 1000, "buffer_size": 64, "top_k": 2,
          "concepts": "red,green,blue,circle,square", "caption_weight": 0.7, "aux_weight": 1.3,
          "heads": 2, "multimodal_layers": 1, "max_len": 16}


def objective(model: nn.Module, **params: Any) -> NlipCompletionLoss:
    obj = build_objective(ObjectiveSpec(name="nlip_completion", params={**PARAMS, **params}))
    obj.setup(SetupContext(model=model, embed_dim=D, text_width=D, vocab_size=V,
                           tokenizer=TOKENIZER))
    return obj.double()


def data(seed: int) -> dict[str, Tensor]:
    """N rows: uint8 pixels (N, 3, 4, 4) and tokenised captions (N, L)."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "small", "big", "on", "the", "left"]
    texts = [" ".join(words[int(j)] for j in torch.randint(0, 10, (int(n),), generator=g))
             for n in torch.randint(1, 6, (N,), generator=g)]
    ids, mask = TOKENIZER(texts)
    return {schema.PIXELS: torch.randint(0, 256, (N, 3, 4, 4), generator=g, dtype=torch.uint8),
            schema.TOKENS: torch.from_numpy(ids), schema.TOKEN_MASK: torch.from_numpy(mask)}


def set_gmm(obj: NlipCompletionLoss, means: list[float], variances: list[float],
            weights: list[float], step: int = 1) -> None:
    for name, value in zip(("gmm_means", "gmm_vars", "gmm_weights"), (means, variances, weights)):
        getattr(obj, name).copy_(torch.tensor(value, dtype=F64))
    obj.fitted.fill_(True)
    obj.step.fill_(step)


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_shapes_determinism_and_concepts() -> None:
    torch.manual_seed(0)
    model = TinyModel().train()
    obj = objective(model)
    batch = data(0)
    first, again = obj.prepare(batch), obj.prepare(batch)
    ids, mask = first[schema.COMPLETION_TOKENS], first[schema.COMPLETION_MASK]
    assert ids.shape == mask.shape == (N, L) and ids.dtype == mask.dtype == torch.long
    assert first[schema.COMPLETION_CONCEPTS].shape == (N, 2)
    for key in first:
        assert torch.equal(first[key], again[key]), key                # deterministic
    assert (ids[:, 0] == BOS).all() and torch.equal(mask, (ids != PAD).long())
    assert model.training and model.dropout.training                   # mode restored
    # concepts: the eval-mode text embeddings of the words; top-2 by cosine of each image
    model.eval()
    with torch.no_grad():
        words = TOKENIZER(concept_words(PARAMS["concepts"]))
        want = model.encode_text(*(torch.from_numpy(a) for a in words))[0]
        emb = model.encode_image(batch[schema.PIXELS])[0]
    torch.testing.assert_close(obj.concept_embeds, want)
    assert torch.equal(first[schema.COMPLETION_CONCEPTS], top_concepts(emb, want, 2))
    assert int(obj.concept_at) == 0


def test_concepts_refresh_every_concept_refresh_steps() -> None:
    torch.manual_seed(1)
    model = TinyModel()
    obj = objective(model, concept_refresh=5)
    batch = data(1)
    obj.prepare(batch)
    before = obj.concept_embeds.clone()
    with torch.no_grad():
        model.tok.weight.mul_(-1.0)                 # the text tower moves: e_k -> -e_k
        model.text_proj.bias.mul_(-1.0)
    obj.step.fill_(4)
    obj.prepare(batch)
    assert torch.equal(obj.concept_embeds, before) and int(obj.concept_at) == 0
    obj.step.fill_(5)
    obj.prepare(batch)
    torch.testing.assert_close(obj.concept_embeds, -before)
    assert int(obj.concept_at) == 5


# --- the whole objective -----------------------------------------------------------------------


def test_forward_matches_the_equation() -> None:
    """A set GMM: L = L_har + w_cap L_cap + w_aux L_aux with p_i from the posterior of l_i;
    the caption memory is [image tokens; the decoder's embeddings of the concepts' words]."""
    torch.manual_seed(2)
    model = TinyModel().eval()
    obj = objective(model)
    batch = data(2)
    batch = {**batch, **obj.prepare(batch)}
    needs = obj.needs
    out = model(batch, needs)
    u, t, s = out.image_embeds, out.text_embeds, out.logit_scale
    with torch.no_grad():
        z = s * u @ t.T
        pair = 0.5 * (F.cross_entropy(z, torch.arange(N), reduction="none")
                      + F.cross_entropy(z.T, torch.arange(N), reduction="none"))
    means = [pair.min().item(), pair.max().item()]
    set_gmm(obj, means, [0.05, 0.05], [0.5, 0.5])
    p = torch.tensor([reference_posterior(v, means, [0.05, 0.05], [0.5, 0.5])
                      for v in pair.tolist()], dtype=F64)
    assert p.min() < 0.1 and p.max() > 0.9
    result = obj(batch, out, Dist())

    concepts = batch[schema.COMPLETION_CONCEPTS]
    word_ids = [[int(i) for k in row for i in obj.concept_words[k][obj.concept_word_mask[k]]]
                for row in concepts]
    ids, mask = batch[schema.TOKENS], batch[schema.TOKEN_MASK]
    logits = []
    for i in range(N):                                                 # one row at a time
        memory = torch.cat((out.image_tokens[i], obj.decoder.embed(torch.tensor(word_ids[i]))))
        logits.append(obj.decoder(ids[i:i + 1, :-1], mask[i:i + 1, :-1], memory[None])[0])
    cap = reference_caption(torch.stack(logits), ids[:, 1:], mask[:, 1:].bool(), 1 - p)
    aux = reference_aux(u, out.extra[COMPLETION_EMBEDS], s, p)
    want = reference_loss(u, t, s, p) + 0.7 * cap + 1.3 * aux
    torch.testing.assert_close(result.loss, want)
    params = (model.patch.weight, model.tok.weight, obj.decoder.embed.weight)
    got = torch.autograd.grad(result.loss, params, retain_graph=True)   # shared graph
    for a, b in zip(got, grads(want, params)):
        torch.testing.assert_close(a, b)
    assert result.metrics["p_noise"] == pytest.approx(p.mean().item(), rel=1e-9)
    assert result.metrics["noisy_rows"] == float((p > 0.5).sum())
    assert result.metrics["caption_loss"] == pytest.approx(cap.item(), rel=1e-9)
    assert result.metrics["aux_loss"] == pytest.approx(aux.item(), rel=1e-9)


def test_forward_without_prepare_is_a_clear_error() -> None:
    model = TinyModel()
    obj = objective(model)
    batch = data(3)
    with pytest.raises(ValueError, match="ObjectiveMix.prepare"):
        obj(batch, model(batch, ()), Dist())


# --- config ------------------------------------------------------------------------------------


def test_registry_and_config_errors() -> None:
    assert isinstance(build_objective(ObjectiveSpec(name="nlip_completion")), NlipCompletionLoss)
    assert NlipCompletionLoss.name == "nlip_completion"
    for bad, message in (({"concepts": " , "}, "at least one word"),
                         ({"concepts": "red,red"}, "distinct"),
                         ({"concepts": "red,blue", "top_k": 3}, r"top_k must be in \[1, 2\]"),
                         ({"top_k": 0}, "top_k"), ({"concept_refresh": 0}, "concept_refresh"),
                         ({"caption_weight": -1.0}, "caption_weight"),
                         ({"aux_weight": -0.5}, "aux_weight"),
                         ({"multimodal_layers": 0}, "multimodal_layers"),
                         ({"max_len": 1}, "max_len"), ({"eval_samples": 0}, "eval_samples")):
        with pytest.raises(ValueError, match="nlip_completion: .*" + message):
            validate_spec(ObjectiveSpec(name="nlip_completion", params=bad))
    with pytest.raises(ValueError, match="nlip: strength"):            # NLIP's own checks
        validate_spec(ObjectiveSpec(name="nlip_completion", params={"strength": 2.0}))
    with pytest.raises(UnknownNameError, match="'local', 'global'"):
        validate_spec(ObjectiveSpec(name="nlip_completion", params={"gather": "local_nograd"}))
    with pytest.raises(UnknownNameError, match="valid params"):
        validate_spec(ObjectiveSpec(name="nlip_completion", params={"topk": 2}))
    obj = build_objective(ObjectiveSpec(name="nlip_completion"))
    with pytest.raises(ValueError, match="SetupContext.tokenizer"):
        obj.setup(SetupContext(model=TinyModel(), embed_dim=D, text_width=D, vocab_size=V))
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        build_objective(ObjectiveSpec(name="nlip_completion", params={"heads": 3})).setup(
            SetupContext(model=TinyModel(), embed_dim=D, text_width=D, vocab_size=V,
                         tokenizer=TOKENIZER))
    with pytest.raises(ValueError, match="setup"):
        obj.prepare(data(0))


def test_prepare_on_a_real_dual_encoder() -> None:
    """The built-in tiny towers (ViT + BERT): completions of the batch's token length."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, vision_kwargs={
        "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
        text={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64}),
        image_size=16, vocab_size=V, context_length=L)
    obj = build_objective(ObjectiveSpec(name="nlip_completion", params={"top_k": 2}))
    obj.setup(SetupContext(model=model, embed_dim=32, text_width=32, vocab_size=V,
                           tokenizer=TOKENIZER))
    batch = {schema.PIXELS: torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8),
             schema.TOKENS: torch.ones(3, L, dtype=torch.long)}
    cols = obj.prepare(batch)
    assert cols[schema.COMPLETION_TOKENS].shape == (3, L)
    assert cols[schema.COMPLETION_CONCEPTS].shape == (3, 2)
    assert cols[schema.COMPLETION_CONCEPTS].max() < 14               # the 14 default words
    batch = {**batch, schema.TOKEN_MASK: torch.ones(3, L, dtype=torch.long), **cols}
    out = model(batch, obj.needs)
    assert out.extra[COMPLETION_EMBEDS].shape == (3, 32)
    torch.testing.assert_close(out.extra[COMPLETION_EMBEDS].norm(dim=-1), torch.ones(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):               # the bf16 training path
        result = obj(batch, model(batch, obj.needs), Dist())
    result.loss.backward()
    assert torch.isfinite(result.loss) and result.metrics["caption_loss"] > 0
    grad = obj.decoder.embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_evaluate_reports_completion_caption_metrics() -> None:
    torch.manual_seed(4)
    model = TinyModel().eval()
    obj = objective(model, eval_samples=5)
    rows = data(4)
    held = HeldOut(pixels=rows[schema.PIXELS], tokens=rows[schema.TOKENS],
                   token_mask=rows[schema.TOKEN_MASK], labels=torch.arange(N),
                   classnames=["a"], templates=["{}"])
    metrics = ObjectiveMix({"nlipc": obj}).evaluate(model, held, TOKENIZER)
    assert set(metrics) == {f"completion_{m}_{d}" for m in ("bleu4", "f1")
                            for d in ("greedy", "beam")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert int(obj.concept_at) == 0                                   # embedded on first use
