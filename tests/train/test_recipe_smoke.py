"""Every recipe trains in-process (no Ray): build_state -> train_step on one repeated batch.

The batch is made the way ingest makes it (synthetic JPEG samples -> ``prepare_rows`` with the
recipe's tokenizer and decode spec). Big recipes keep their architecture family but are shrunk
through dotted overrides so the step runs in about a second on CPU.

    pytest tests/train/test_recipe_smoke.py -q
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from vlmray.config import Config
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import EXTRA_TEXT_COLUMNS, decode_spec, tokenizer_for
from vlmray.data.synthetic import make_sample
from vlmray.data.views import ViewStage
from vlmray.distributed import Dist
from vlmray.recipes import list_recipes, recipe
from vlmray.train.loop import train_step
from vlmray.train.optim import lr_factor
from vlmray.train.state import build_state
from vlmray.validate import validate

STEPS, BATCH, LR = 16, 16, 5e-4   # no warmup: the full lr from step 0 (2e-3 collapses)
TRAIN = {"train.lr": str(LR), "train.warmup_steps": "0", "train.steps": "1000",
         "train.batch_size": str(BATCH), "train.device": "cpu"}
SHRINK = {"data.image_size": "32", "data.context_length": "16", "data.vocab_size": "1024",
          "model.embed_dim": "32",
          "model.text": '{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, '
                        '"num_attention_heads": 2, "intermediate_size": 64}'}
SHRINK_VIT = {"model.vision_kwargs": '{"patch_size": 8, "embed_dim": 32, "depth": 1, '
                                     '"num_heads": 2, "mlp_ratio": 2.0}'}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONTRASTIVE_AT_CHANCE = {"clip", "declip_mv", "filip", "nlip", "otter", "pyramidclip",
                         "unicl", "multicrop_clip"}
"""First objectives whose loss starts near log(B) (SigLIP's sigmoid loss starts near 10)."""

REF_DIM = 24   # width of RA-CLIP's reference embeddings in the smoke batch (frozen embedder's)


def small_config(name: str) -> Config:
    """The recipe at its own size when it is clip_tiny, else shrunk; lr raised, no warmup."""
    overrides: dict[str, Any] = dict(TRAIN)
    if name != "clip_tiny":
        overrides.update(SHRINK)
        if recipe(name).model.vision.startswith("vit_"):
            overrides.update(SHRINK_VIT)
    if recipe(name).model.ra_layers:
        overrides["model.ra_ref_dim"] = str(REF_DIM)   # what the retrieval plan fills in
    return validate(recipe(name, **overrides))


def retrieval_columns(cfg: Config, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What ``data.retrieval`` attaches, made the way its stages shape it: RA-CLIP references
    (a random frozen-embedder space where each row's first reference carries its label), or
    each row's neighbour caption (another row of the same class, tokenised)."""
    attach, k = cfg.data.retrieval.attach, cfg.data.retrieval.k
    labels, n = rows[schema.LABEL], len(rows[schema.LABEL])
    gen = torch.Generator().manual_seed(0)
    if attach == "references":
        space = torch.nn.functional.normalize(torch.randn(64, REF_DIM, generator=gen), dim=-1)
        ref = space[torch.randint(0, 64, (n, k), generator=gen)]
        ref[:, 0] = space[torch.as_tensor(labels) % 64]
        mask = torch.ones(n, k)
        mask[1::2, k // 2:] = 0.0                                   # some rows found fewer
        return {schema.REF_IMAGE_EMBEDS: ref, schema.REF_TEXT_EMBEDS: ref.flip(-1).clone(),
                schema.REF_MASK: mask}
    if attach == "neighbour_text":
        partner = [int(np.flatnonzero(labels == y)[-1]) for y in labels]
        ids, mask = tokenizer_for(cfg.data)([str(rows[schema.TEXT][j]) for j in partner])
        return {schema.NN_TOKENS: torch.from_numpy(ids),
                schema.NN_TOKEN_MASK: torch.from_numpy(mask)}
    return {}


def rewritten(cfg: Config, samples: list[dict]) -> dict[str, list]:
    """What the ``data.rewrite`` ingest prefix adds, made in plain Python: the offline
    backend's rewrites (``texts_aug``) and the oracle's synthetic captions."""
    rw, out = cfg.data.rewrite, {}
    if rw.k and rw.backend == "offline":
        from vlmray.rewrite.offline import paraphrase

        out["texts_aug"] = [[s[schema.TEXT]] + [
            paraphrase(s[schema.TEXT], seed=rw.sampling.seed, key=s[schema.KEY], slot=j)
            for j in range(rw.k)] for s in samples]
    if rw.captioner == "oracle":
        from vlmray.rewrite.captioners import oracle_caption

        out["synthetic"] = [oracle_caption(s[schema.META], s[schema.KEY]) for s in samples]
    return out


def make_batch(cfg: Config) -> dict[str, torch.Tensor]:
    syn = SyntheticConfig(num_train=BATCH, num_eval=BATCH, image_size=48, shard_size=BATCH)
    samples = [make_sample(syn, "eval", i) for i in range(BATCH)]
    rows = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                        [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                        decode_spec(cfg.data), tokenizer_for(cfg.data),
                        **rewritten(cfg, samples))
    assert (rows[schema.REJECT_REASON] == "").all()
    cols = (schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.LABEL)
    if cfg.data.regions:   # region-word matching: the region columns ingest carries
        cols += (schema.REGION_BOXES, schema.REGION_SPANS, schema.REGION_MASK)
    cols += tuple(c for name in cfg.data.extra_texts for c in EXTRA_TEXT_COLUMNS[name])
    arrays = {c: rows[c] for c in cols}
    if cfg.data.views.enabled:   # the augmented views, as augment_train's Ray Data stage adds them
        if cfg.data.views.needs_text:
            arrays[schema.TEXT] = rows[schema.TEXT]
        arrays = ViewStage(cfg.data)(arrays)           # reads TEXT, drops it
    batch = {c: torch.from_numpy(np.ascontiguousarray(a)) for c, a in arrays.items()}
    return {**batch, **retrieval_columns(cfg, rows)}


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_trains_on_one_batch(name: str) -> None:
    cfg = small_config(name)
    state = build_state(cfg, device=torch.device("cpu"))
    assert not state.bf16 and state.grad_clip == cfg.train.grad_clip
    batch = make_batch(cfg)
    assert batch[schema.PIXELS].shape == (BATCH, 3, cfg.data.image_size, cfg.data.image_size)
    assert batch[schema.TOKENS].shape == (BATCH, cfg.data.context_length)

    dist = Dist.current()
    history = [train_step(state, batch, dist) for _ in range(STEPS)]
    losses = [m["loss"] for m in history]
    for step, m in enumerate(history):
        first = f"loss/{cfg.objectives[0].name}"
        assert {"loss", first, "lr", "logit_scale", "grad_norm"} <= set(m), sorted(m)
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["lr"] == pytest.approx(LR * lr_factor(step + 1, cfg.train))
        assert m["grad_norm"] > 0
    if cfg.objectives[0].name in CONTRASTIVE_AT_CHANCE:
        # ~chance at init (a BatchNorm CNN tower starts with spread image embeddings: 1.4x)
        first = f"loss/{cfg.objectives[0].name}"
        assert history[0][first] == pytest.approx(math.log(BATCH), rel=0.4)
    # DeCLIP's NNS queue is empty at step 0 (that term is 0), so its trend starts at step 1.
    start = 1 if history[0].get("declip_nns/queue_empty") == 1.0 else 0
    trend = losses[start:]
    assert trend[-1] < trend[0] - 0.05, losses
    assert sum(trend[-3:]) < sum(trend[:3]) - 0.1, losses
    assert history[-1]["logit_scale"] != pytest.approx(1 / cfg.model.init_temperature, abs=1e-6)
    assert state.scheduler.last_epoch == STEPS
