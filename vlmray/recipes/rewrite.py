"""Recipes that train on rewritten or synthetic captions: La-CLIP (LLM rewrites, one drawn per
step) and ALIP (a captioner's synthetic caption beside the alt-text).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig
from vlmray.config.data import ViewsConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.config.rewrite import RewriteConfig
from vlmray.recipes.registry import RECIPES


@RECIPES.register("laclip_tiny")
def laclip_tiny() -> Config:
    """La-CLIP (Fan et al., 2023, "Improving CLIP Training with Language Rewrites") with
    clip_tiny's towers and settings: every caption gets k = 3 rewrites in a streaming prefix
    of ingest (``data.rewrite``), and each time a row is seen its text is drawn uniformly among
    the original and its rewrites (``data.views.caption_sampling="uniform"``); the loss is
    CLIP's, unchanged. The images get no extra augmentation here (the paper keeps CLIP's crop).
    The ``offline`` backend is a model-free EDA-style paraphraser (synonyms, word order,
    attribute phrasing): the paper's own EDA baseline, not an LLM. For LLM rewrites as in the
    paper (which used ChatGPT / Bard examples to prompt LLaMA-7B in context) switch the backend:
    ``--data.rewrite.backend transformers --data.rewrite.model smollm2`` (a local causal LM
    in a Ray actor pool; ``vllm`` for Ray Data's LLM API on GPUs). A rewrite that fails
    validation falls back to the original caption and is counted by reason in the run summary
    (``rewrite_fallbacks``)."""
    return Config(recipe="laclip_tiny",
                  data=DataConfig(rewrite=RewriteConfig(backend="offline", k=3),
                                  views=ViewsConfig(caption_sampling="uniform")),
                  objectives=[ObjectiveSpec(name="clip")])


@RECIPES.register("alip_tiny")
def alip_tiny() -> Config:
    """ALIP (Yang et al., ICCV 2023, "ALIP: Adaptive Language-Image Pre-training with
    Synthetic Caption") with clip_tiny's towers and settings: a streaming prefix of ingest
    (``data.rewrite``) writes a synthetic caption per image, tokenised into
    ``synthetic_tokens`` (``data.extra_texts=["synthetic_caption"]``), and the ``alip``
    objective trains image-text and image-caption InfoNCE through one text tower, each row
    weighted by the Language / Description Consistency Gates (gamma = 2, EMA momentum 0.99).
    Deviations: the paper captions YFCC15M with OFA; here the captioner is the built-in data's
    ``oracle`` (its generator describes each true scene from the sidecar: a perfect captioner,
    for the built-in data only). The paper's similarity EMAs start at 1 and forget it within
    ~1/(1-m) = 100 steps of a long run; in this 300-step run every weight would sit near 0.1
    for most of training, so the EMAs start at the first batch's means
    (``init_from_batch=True``). For a real captioner: ``--data.rewrite.captioner transformers
    --data.rewrite.captioner_model <local image-to-text model dir>`` (``vllm`` on GPUs)."""
    return Config(recipe="alip_tiny",
                  data=DataConfig(rewrite=RewriteConfig(captioner="oracle"),
                                  extra_texts=["synthetic_caption"]),
                  objectives=[ObjectiveSpec(name="alip", params={"init_from_batch": True})])
