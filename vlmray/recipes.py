"""Recipes: functions that return a complete ``Config``. ``clip_tiny`` is the default.

    cfg = recipe("clip_tiny", **{"train.steps": "200"})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmray._registry import Registry
from vlmray.config import Config, DataConfig, ModelConfig, TrainConfig, apply_overrides
from vlmray.objectives.registry import ObjectiveSpec
from vlmray.retrieval.config import RetrievalConfig

RECIPES: Registry[Callable[[], Config]] = Registry("recipe")


@RECIPES.register("clip_tiny")
def clip_tiny() -> Config:
    """CLIP on the built-in noisy data: a 3-layer ViT (32 px, 8 px patches) and a 2-layer BERT,
    128-d embeddings; learns zero-shot well above chance in a few minutes on 2 CPU cores."""
    return Config(recipe="clip_tiny", objectives=[ObjectiveSpec(name="clip")])


@RECIPES.register("clip_vit_b16")
def clip_vit_b16() -> Config:
    """CLIP ViT-B/16 + a 12-layer BERT-base text tower at 224 px, for GPU clusters; point
    ``data.source`` at real shards (img2dataset layout)."""
    return Config(
        recipe="clip_vit_b16",
        data=DataConfig(image_size=224, context_length=77, vocab_size=49408),
        model=ModelConfig(vision="vit_base_patch16_224", vision_kwargs={}, embed_dim=512,
                          text={"model_type": "bert", "hidden_size": 512, "num_hidden_layers": 12,
                                "num_attention_heads": 8, "intermediate_size": 2048}),
        train=TrainConfig(steps=10_000, batch_size=1024, lr=5e-4, warmup_steps=500,
                          cpus_per_worker=4, checkpoint_every=1000, log_every=50),
        objectives=[ObjectiveSpec(name="clip")],
    )


@RECIPES.register("raclip_tiny")
def raclip_tiny() -> Config:
    """RA-CLIP (Xie et al., 2023) on the built-in data: 20% of the pairs are held out as the
    reference set, embedded by a frozen CLIP (bootstrapped on that set for 100 steps) into a
    FAISS index; each training image's 8 nearest reference pairs feed the retrieval-augmentation
    module (the image embedding attends over their image and text embeddings); CLIP loss.
    The reference set is disjoint from the training rows, so only exact copies (cosine 1) are
    skipped as duplicates: scenes of one class sit at cosine ~0.99 in a small embedder's
    space, and a lower threshold would drop every real neighbour."""
    return Config(
        recipe="raclip_tiny",
        data=DataConfig(retrieval=RetrievalConfig(attach="references", k=8,
                                                  reference_fraction=0.2,
                                                  duplicate_threshold=1.0)),
        model=ModelConfig(ra_layers=1, ra_heads=4),
        objectives=[ObjectiveSpec(name="clip")],
    )


@RECIPES.register("declip_nns_tiny")
def declip_nns_tiny() -> Config:
    """DeCLIP's nearest-neighbour supervision (Li et al., 2022) beside CLIP: each row carries
    the caption of its nearest non-duplicate neighbour, found offline by a FAISS index over
    all training captions embedded with the MiniLM sentence encoder; that caption is an extra
    positive for the image (``declip_nns`` with ``source="queue"`` uses DeCLIP's online
    feature queue instead)."""
    return Config(
        recipe="declip_nns_tiny",
        data=DataConfig(retrieval=RetrievalConfig(attach="neighbour_text", k=1,
                                                  duplicate_threshold=0.99)),
        objectives=[ObjectiveSpec(name="clip", weight=0.8),
                    ObjectiveSpec(name="declip_nns", weight=0.2, params={"source": "index"})],
    )


@RECIPES.register("filip_tiny")
def filip_tiny() -> Config:
    """FILIP (Yao et al., 2021) on the built-in data with clip_tiny's towers: token-wise late
    interaction (each patch's best word, each word's best patch) beside CLIP's pooled InfoNCE.
    FILIP's loss drops the CLS token, and zero-shot eval and retrieval score the pooled
    embeddings, so the CLIP term keeps them trained."""
    return Config(recipe="filip_tiny",
                  objectives=[ObjectiveSpec(name="filip", weight=0.5),
                              ObjectiveSpec(name="clip", weight=0.5)])


@RECIPES.register("siglip_tiny")
def siglip_tiny() -> Config:
    """SigLIP (Zhai et al., 2023) on the built-in noisy data: clip_tiny's towers with the
    pairwise sigmoid loss instead of the softmax; t = exp(t') starts at 10 and the learnable
    bias b at -10, as in the paper. Negatives from other workers arrive by ring exchange, so
    each worker holds only B x B logits. Keep the default warmup: at b = -10 the first steps
    pull all embeddings together, and the model separates them again after ~40-60 steps."""
    return Config(recipe="siglip_tiny",
                  model=ModelConfig(init_temperature=0.1, init_logit_bias=-10.0),
                  objectives=[ObjectiveSpec(name="siglip")])


@RECIPES.register("unicl_tiny")
def unicl_tiny() -> Config:
    """UniCL (Yang et al., 2022) on the built-in data: clip_tiny's towers trained with the
    unified image-text-label loss. Every built-in row carries its class label, so same-class
    pairs in a batch are extra positives both ways; caption-only rows (label -1) keep CLIP's
    diagonal."""
    return Config(recipe="unicl_tiny", objectives=[ObjectiveSpec(name="unicl")])


@RECIPES.register("align_tiny")
def align_tiny() -> Config:
    """ALIGN (Jia et al., 2021) on the built-in data: an EfficientNet image tower (timm's tiny
    ``test_efficientnet``, MBConv + squeeze-excite + BatchNorm, widened 1.5x, at 64 px), a
    2-layer BERT pooled at its first token ([CLS]), and the normalised-softmax contrastive loss
    with label smoothing 0.1."""
    return Config(
        recipe="align_tiny",
        data=DataConfig(image_size=64),
        model=ModelConfig(vision="test_efficientnet", vision_kwargs={"channel_multiplier": 1.5},
                          text_pooling="first"),
        objectives=[ObjectiveSpec(name="clip", params={"label_smoothing": 0.1})],
    )


def recipe(name: str, **overrides: Any) -> Config:
    """The named recipe's config with dotted overrides (``**{"train.steps": 100}``) applied."""
    cfg = RECIPES.get(name)()
    return apply_overrides(cfg, overrides) if overrides else cfg


def list_recipes() -> list[str]:
    return RECIPES.names()


__all__ = ["RECIPES", "list_recipes", "recipe"]
