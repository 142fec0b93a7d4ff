"""Settings of the data stages outside curation: the built-in dataset, augmented views, mixup,
and where the stages run with how much memory the stream may hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

NOISE_KINDS = ("mismatch", "junk", "near_dup", "corrupt", "overlong")


@dataclass(kw_only=True)


class SyntheticConfig:
    """How much data to generate and how noisy the train split is."""

    seed: int = 0
    """Master seed; every sample's randomness derives from (seed, split, index)."""
    num_train: int = 8000
    """Number of train samples."""
    num_eval: int = 1000
    """Number of eval samples (always clean)."""
    image_size: int = 64
    """Side of the square images, in pixels."""
    shard_size: int = 1000
    """Samples per .tar shard."""
    mismatch_frac: float = 0.1
    """Train fraction whose caption describes another image."""
    junk_frac: float = 0.05
    """Train fraction with junk alt-text ("IMG_4821.jpg", "click here", ...)."""
    near_dup_frac: float = 0.05
    """Train fraction that is a slightly perturbed copy of an earlier image in its shard."""
    corrupt_frac: float = 0.01
    """Train fraction whose image bytes are truncated or garbage (decode fails)."""
    overlong_frac: float = 0.01
    """Train fraction with keyword-stuffed captions longer than overlong_chars."""
    overlong_chars: int = 2000
    """Overlong captions are longer than this many characters."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "image_size", "shard_size", "overlong_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        for kind in NOISE_KINDS:
            frac = getattr(self, f"{kind}_frac")
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"SyntheticConfig.{kind}_frac must be in [0, 1], got {frac}")
        total = sum(getattr(self, f"{k}_frac") for k in NOISE_KINDS)
        if total > 1.0 + 1e-9:
            fields = ", ".join(f"{k}_frac" for k in NOISE_KINDS)
            raise ValueError(f"SyntheticConfig noise fractions ({fields}) sum to {total} > 1")

    def num(self, split: str) -> int:
        """Number of samples in ``split``."""
        return {"train": self.num_train, "eval": self.num_eval}[split]

    def num_shards(self, split: str) -> int:
        """Number of shards in ``split``."""
        return -(-self.num(split) // self.shard_size)

IMAGE_VIEW_KINDS = ("global", "local")

TEXT_VIEW_KINDS = ("eda", "summary", "attributes")

CAPTION_SAMPLING = ("original", "uniform")


@dataclass(kw_only=True)


class ViewsConfig:
    image: list[str] = field(default_factory=list)
    """Augmented image views, in order (each one of ``global``: a random resized crop of
    scale [global_min_scale, 1] with flip and colour jitter; ``local``: a crop of scale
    [local_min_scale, local_max_scale], resized to the full side)."""
    global_min_scale: float = 0.4
    """Smallest area fraction of a ``global`` crop."""
    local_min_scale: float = 0.05
    """Smallest area fraction of a ``local`` crop."""
    local_max_scale: float = 0.4
    """Largest area fraction of a ``local`` crop."""
    text: list[str] = field(default_factory=list)
    """Derived texts, in order (each one of ``eda``: random word deletion/swap/repeat as EDA;
    ``summary``: the caption's first clause; ``attributes``: its content words)."""
    eda_prob: float = 0.1
    """Per-word probability of each EDA edit."""
    mlm_prob: float = 0.0
    """Fraction of caption tokens masked for masked language modelling (0: off; BERT: 0.15)."""
    render_text: bool = False
    """Draw each caption onto an image (``schema.TEXT_PIXELS``) for CLIPPO's shared tower."""
    seed: int = 0
    """Seed of the view randomness (with the epoch and row ids, else call counters and pid)."""
    caption_sampling: Literal["original", "uniform"] = "original"
    """``original``: TOKENS is the row's caption. ``uniform`` (La-CLIP): each time a row is
    seen, TOKENS / TOKEN_MASK become one of its non-empty TOKENS_AUG slots (the original
    caption and its rewrites), drawn uniformly; needs ``texts_aug`` in ``data.extra_texts``.
    MLM masks the drawn tokens; text views and ``render_text`` still read the original caption
    string (TEXT): the rewrites reach training as tokens only."""

    def __post_init__(self) -> None:
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(f"data.views.caption_sampling: {self.caption_sampling!r} is not "
                             f"one of {list(CAPTION_SAMPLING)}")
        for kind in self.image:
            if kind not in IMAGE_VIEW_KINDS:
                raise ValueError(f"data.views.image: {kind!r} is not one of "
                                 f"{list(IMAGE_VIEW_KINDS)}")
        for kind in self.text:
            if kind not in TEXT_VIEW_KINDS:
                raise ValueError(f"data.views.text: {kind!r} is not one of "
                                 f"{list(TEXT_VIEW_KINDS)}")
        if not 0.0 < self.global_min_scale <= 1.0:
            raise ValueError(f"data.views.global_min_scale must be in (0, 1], got "
                             f"{self.global_min_scale}")
        if not 0.0 < self.local_min_scale <= self.local_max_scale <= 1.0:
            raise ValueError("data.views: need 0 < local_min_scale <= local_max_scale <= 1, got "
                             f"{self.local_min_scale}, {self.local_max_scale}")
        for name in ("eda_prob", "mlm_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.views.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return bool(self.image or self.text or self.mlm_prob > 0 or self.render_text
                    or self.caption_sampling != "original")

    @property
    def needs_text(self) -> bool:
        """Whether the stage reads the caption string (so training rows must keep it)."""
        return bool(self.text or self.render_text)


@dataclass(kw_only=True)


class MixupConfig:
    """Coin-flip image-text mixup in Ray Data (``vlmray.data.mixup``; after ZeroVL)."""

    prob: float = 0.0
    """Probability that a row is mixed with its partner row (0: off)."""
    alpha: float = 0.1
    """Mixing weights lam = max(l, 1 - l) with l ~ Beta(alpha, alpha); ZeroVL uses 0.1."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"data.mixup.prob must be in [0, 1], got {self.prob}")
        if not self.alpha > 0 or not math.isfinite(self.alpha):
            raise ValueError(f"data.mixup.alpha must be a positive number, got {self.alpha}")

_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")

MIN_BLOCK_BYTES = 1 << 20

DEFAULT_BLOCK_BYTES = 128 << 20
"""Ray Data's ``DEFAULT_TARGET_MAX_BLOCK_SIZE`` (kept here so configs validate without Ray)."""


@dataclass(kw_only=True)


class PlacementConfig:
    """Custom resources of the data stages and the memory budget of the stream."""

    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources every data task and actor requests besides its CPUs, e.g.
    ``{"data": 0.001}``: the stages then run only on nodes started with that resource (a CPU
    worker group with ``rayStartParams: {resources: '"{\\"data\\": 1}"'}``); empty = any node."""
    model_resources: dict[str, float] = field(default_factory=dict)
    """The same for model-bearing stages (CLIP scoring, embedding, captioning and LLM rewrite
    actors), e.g. ``{"embed": 0.001}`` to put them on their own group; empty = ``resources``."""
    object_store_bytes: int = 0
    """Object-store budget of the data stages (Ray Data's
    ``resource_limits.object_store_memory``): its backpressure pauses reading and decoding
    while the stream's blocks fill it; 0 = Ray Data's default (a share of the object store)."""
    cpu_budget: float = 0.0
    """CPUs the data stages may hold at once (``resource_limits.cpu``), e.g. the data group's
    cores; 0 = Ray Data's default (the cluster's CPUs less what training reserved)."""
    target_block_bytes: int = 0
    """Largest block a data stage emits (``DataContext.target_max_block_size``); the object
    store and each task hold a few such blocks; 0 = Ray Data's default (128 MiB)."""
    read_concurrency: int = 0
    """Input files read at once (each read task holds one file's rows until it has emitted
    them); 0 = as many as the CPUs and the object-store budget allow."""
    prefetch_batches: int = 2
    """Batches each training worker fetches ahead of the one it trains on
    (``iter_torch_batches(prefetch_batches=...)``)."""

    def __post_init__(self) -> None:
        _check_resources("resources", self.resources)
        _check_resources("model_resources", self.model_resources)
        for name in ("object_store_bytes", "target_block_bytes", "read_concurrency",
                     "prefetch_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"placement.{name} must be an int >= 0 (0 = Ray's default), "
                                 f"got {value!r}")
        if (isinstance(self.cpu_budget, bool) or not isinstance(self.cpu_budget, (int, float))
                or not math.isfinite(self.cpu_budget) or self.cpu_budget < 0):
            raise ValueError(f"placement.cpu_budget must be a number >= 0 (0 = Ray's default), "
                             f"got {self.cpu_budget!r}")
        if 0 < self.target_block_bytes < MIN_BLOCK_BYTES:
            raise ValueError(f"placement.target_block_bytes={self.target_block_bytes} is below "
                             f"Ray Data's 1 MiB minimum block; set it >= {MIN_BLOCK_BYTES} or 0")
        block = self.target_block_bytes or DEFAULT_BLOCK_BYTES
        if 0 < self.object_store_bytes < 2 * block:
            raise ValueError(f"placement.object_store_bytes={self.object_store_bytes} holds "
                             f"fewer than 2 blocks of {block} bytes, so the stream could not "
                             f"flow: raise it to >= {2 * block} or lower "
                             f"placement.target_block_bytes")


def _check_resources(name: str, resources: Any) -> None:
    """Custom resource names -> positive finite amounts; CPU/GPU/memory are set per stage."""
    if not isinstance(resources, dict):
        raise TypeError(f"placement.{name} must be a dict of custom resource -> amount, "
                        f'e.g. {{"data": 0.001}}, got {resources!r}')
    for key, amount in resources.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"placement.{name}: resource names are non-empty strings, "
                             f"got {key!r}")
        if key in _RAY_RESOURCES:
            raise ValueError(f"placement.{name}: {key!r} is a Ray resource each stage sets "
                             f"itself; name a custom resource your data nodes offer "
                             f'(e.g. {{"data": 0.001}})')
        if (isinstance(amount, bool) or not isinstance(amount, (int, float))
                or not math.isfinite(amount) or amount <= 0):
            raise ValueError(f"placement.{name}[{key!r}] must be a number > 0 (a fraction such "
                             f"as 0.001 only tags the task), got {amount!r}")


__all__ = ["CAPTION_SAMPLING", "DEFAULT_BLOCK_BYTES", "IMAGE_VIEW_KINDS", "MIN_BLOCK_BYTES",
           "NOISE_KINDS", "TEXT_VIEW_KINDS", "MixupConfig", "PlacementConfig", "SyntheticConfig",
           "ViewsConfig"]
