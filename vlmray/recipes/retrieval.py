"""Recipes that train with a FAISS index beside the batch: RA-CLIP's reference pairs and DeCLIP's
nearest-neighbour captions (``data.retrieval``).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig, ModelConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.config.retrieval import RetrievalConfig
from vlmray.recipes.registry import RECIPES


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
