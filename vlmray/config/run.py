"""The run's config tree: ``Config(data=..., model=..., objectives=[...], train=..., eval=...)``.

Every number of the four sections has a range (``Bound``), checked when the section is built,
so a bad value fails with ``ConfigError`` naming the field and its range before any work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmray.config.curation import CurationConfig
from vlmray.config.data import MixupConfig, PlacementConfig, SyntheticConfig, ViewsConfig
from vlmray.config.errors import ConfigError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.config.overrides import dataclass_from_dict
from vlmray.config.retrieval import RetrievalConfig
from vlmray.config.rewrite import RewriteConfig
from vlmray.config.sources import check_sources

SAMPLING_CHOICES = ("mixed", "single_source")

EXTRA_TEXT_CHOICES = ("texts_aug", "synthetic_caption")
"""Values of ``data.extra_texts``."""


@dataclass(frozen=True)
class Bound:
    """The valid values of one numeric field: an int (never a bool) or a finite number (an int
    is a number too), at least ``lo`` (more than ``lo`` when ``lo_open``), at most ``hi``;
    ``optional`` also admits None."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    optional: bool = False

    def admits(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float
                                                     else int):
            return False
        if not math.isfinite(value):
            return False
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        return low_ok and (self.hi is None or value <= self.hi)

    def describe(self) -> str:
        what = "an int" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            what += f" <= {self.hi:g}"
        return f"None or {what}" if self.optional else what


def check_bounds(section: str, obj: object, bounds: dict[str, Bound]) -> None:
    """Raises ``ConfigError`` naming ``section.field`` and its range for the first field of
    ``obj`` that its ``Bound`` does not admit."""
    for name, bound in bounds.items():
        value = getattr(obj, name)
        if not bound.admits(value):
            raise ConfigError(f"{section}.{name} must be {bound.describe()}, got {value!r}")


def _count(lo: int = 0, hi: int | None = None) -> Bound:
    return Bound(int, lo, hi)


def _positive(hi: float | None = None) -> Bound:
    return Bound(float, 0.0, hi, lo_open=True)


DATA_BOUNDS = {"image_size": _count(1), "min_image_side": _count(0),
               "max_text_chars": _count(1), "context_length": _count(3),
               "vocab_size": _count(5), "shuffle_buffer": _count(0), "regions": _count(0),
               "unit_rows": _count(1),
               "max_texts_aug": _count(1)}
"""Ranges of DataConfig's numbers (the hash tokenizer needs 4 special ids + 1 and
BOS + a word + EOS)."""

MODEL_BOUNDS = {"embed_dim": _count(1), "init_temperature": _positive(),
                "max_logit_scale": _positive(), "init_logit_bias": Bound(float, -100.0, 100.0, optional=True),
                "ra_layers": _count(0), "ra_heads": _count(1), "ra_ref_dim": _count(0)}
"""Ranges of ModelConfig's numbers (a logit bias beyond +-100 outweighs any scaled cosine at
the default ``max_logit_scale``: every pair's sigmoid saturates)."""

TRAIN_BOUNDS = {"steps": _count(1), "batch_size": _count(1), "lr": _positive(1.0),
                "weight_decay": Bound(float, 0.0), "warmup_steps": _count(0),
                "min_lr_ratio": Bound(float, 0.0, 1.0), "grad_clip": Bound(float, 0.0),
                "num_workers": _count(0), "cpus_per_worker": Bound(float, 0.0),
                "torch_threads": _count(0), "log_every": _count(1),
                "checkpoint_every": _count(0), "keep_checkpoints": _count(1),
                "max_failures": _count(0), "max_bad_steps": _count(1),
                "seed": _count(0, 2**32 - 1)}
"""Ranges of TrainConfig's numbers. AdamW moves each weight by about ``lr`` a step, so an lr
above 1 never trains; ``max_failures`` -1 would be Ray's unlimited retries."""

EVAL_BOUNDS = {"every": _count(0), "max_samples": _count(1), "batch_size": _count(1)}
"""Ranges of EvalConfig's numbers."""


def check_extra_texts(d: DataConfig) -> None:
    """``DataConfig``'s checks of its extra texts: adds ``texts_aug`` when ``rewrite.k > 0`` and
    ``synthetic_caption`` when ``rewrite.captioner != "none"`` (the prefix makes them), then
    raises ``ValueError`` naming the fix on unknown names, repeats, or
    ``views.caption_sampling="uniform"`` without ``texts_aug`` (``max_texts_aug``'s range is
    in ``DATA_BOUNDS``)."""
    if d.rewrite.k > 0 and "texts_aug" not in d.extra_texts:
        d.extra_texts = [*d.extra_texts, "texts_aug"]
    if d.rewrite.captioner != "none" and "synthetic_caption" not in d.extra_texts:
        d.extra_texts = [*d.extra_texts, "synthetic_caption"]
    bad = [t for t in d.extra_texts if t not in EXTRA_TEXT_CHOICES]
    if bad or len(set(d.extra_texts)) != len(d.extra_texts):
        raise ValueError(f"data.extra_texts={d.extra_texts!r}: each one of "
                         f"{list(EXTRA_TEXT_CHOICES)}, at most once")
    if d.views.caption_sampling == "uniform" and "texts_aug" not in d.extra_texts:
        raise ValueError("data.views.caption_sampling='uniform' draws among each row's "
                         "rewritten captions: add 'texts_aug' to data.extra_texts (rows from "
                         "jobs/rewrite_captions.py shards) or set data.rewrite.k > 0")


@dataclass(kw_only=True)


class DataConfig:
    source: str = "builtin"
    """Dataset root (local path or s3:// URI) holding ``train/*.tar`` (and ``eval/``), a
    curation job's output (``shards/``, webdataset or parquet), or a directory of shards.
    ``builtin`` generates the synthetic noisy dataset into the run dir (``builtin:<seed>?k=v``
    with another seed and ``SyntheticConfig`` fields, as in ``extra_sources``)."""
    eval_source: str = ""
    """Held-out split (a directory of shards with ``classes.json``); default ``<source>/eval``."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator settings used when ``source == "builtin"``."""
    image_size: int = 32
    """Side of the square images fed to the vision tower (decoded, resized in Ray Data)."""
    min_image_side: int = 16
    """Rows whose decoded image is smaller than this on either side are rejected."""
    max_text_chars: int = 1000
    """Rows whose caption is longer than this are rejected (keyword-stuffed alt-text)."""
    context_length: int = 32
    """Tokens per caption, including BOS/EOS."""
    tokenizer: str = "hash"
    """``hash`` (offline, no files) or ``hf:<local dir>`` for a Hugging Face tokenizer."""
    vocab_size: int = 8192
    """Vocabulary size of the ``hash`` tokenizer."""
    shuffle_buffer: int = 2048
    """Rows in each worker's local shuffle buffer with ``cache`` on (Ray's order, 0: off).
    The streamed feed shuffles by its epoch order instead (``unit_rows``)."""
    unit_rows: int = 256
    """The streamed feed's epoch order (:mod:`vlmray.data.order`): input files are cut into
    units of this many rows, permuted per epoch by (train.seed, epoch), dealt to the training
    workers, and read in a per-unit permutation, so every worker's rows at every step depend
    on the seed, the epoch, the world size and the inputs alone, and a checkpoint names the
    next unread row of each worker. Smaller: finer mixing across files and a shorter
    end-of-epoch tail (at most about one unit per worker), more read tasks. Inputs of fewer
    than 16 units' worth of rows get smaller units, so every worker has some."""
    curate: bool = False
    """Run the curation stages (text, image, [score], dedup; settings below) as a streaming
    prefix of training: no curated copy is written, rejects land in ``<run>/rejects``."""
    curation: CurationConfig = field(default_factory=CurationConfig)
    """Curation stage settings used when ``curate`` is on (as ``jobs/curate.py``'s)."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """FAISS neighbours for training rows: RA-CLIP references or DeCLIP NNS neighbour text."""
    views: ViewsConfig = field(default_factory=ViewsConfig)
    """Augmented views added per epoch in Ray Data (DeCLIP, PyramidCLIP, CLIPPO)."""
    extra_sources: list[str] = field(default_factory=list)
    """More training datasets beside ``source``, each resolved like it: a dataset root or shard
    directory (path or URI), or ``builtin:<seed>[?field=value&...]``, another built-in dataset
    (``data.synthetic`` with that seed and the given ``SyntheticConfig`` fields changed)."""
    sampling: Literal["mixed", "single_source"] = "mixed"
    """``mixed``: all sources' rows in one stream. ``single_source``: ZeroVL's debiased
    sampling, every global batch from one source, chosen per step with probability
    proportional to its size."""
    mixup: MixupConfig = field(default_factory=MixupConfig)
    """Coin-flip image-text mixup after the views stage (``prob`` 0: off)."""
    cache: bool = False
    """Hold the accepted, decoded training rows in Ray's object store after the first pass,
    so later epochs read memory instead of the shards. Only for data that fits the object
    store (a few GB); off in every recipe. Off: every epoch streams read -> [curate] ->
    decode again, and memory is bounded by settings, not rows."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Which nodes run the data stages (custom resources for data and for model stages) and the
    stream's memory: object-store budget, CPU budget, block size, read concurrency, prefetch."""
    regions: int = 0
    """K > 0: rows carry up to K object boxes and their caption phrases (``REGION_*`` columns
    from the sidecar's ``boxes`` / ``phrases``) for region-word matching; 0: none."""
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    """Run the caption rewriting (La-CLIP, ``k`` > 0) and captioning (ALIP, ``captioner``)
    stages as a streaming prefix of ingest, as ``curate`` does for curation (default: off)."""
    max_texts_aug: int = 5
    """Slots of TOKENS_AUG: the caption, then up to ``max_texts_aug - 1`` rewrites."""
    extra_texts: list[str] = field(default_factory=list)
    """Texts tokenised into training rows: ``texts_aug`` (TOKENS_AUG), ``synthetic_caption``
    (SYNTHETIC_TOKENS); from the rewrite prefix, else the sidecars (``jobs/rewrite_captions.py``
    shards). Added automatically by ``rewrite.k > 0`` / ``rewrite.captioner``."""

    def __post_init__(self) -> None:
        check_bounds("data", self, DATA_BOUNDS)
        check_extra_texts(self)   # adds what data.rewrite makes; caption_sampling needs texts_aug
        if self.sampling not in SAMPLING_CHOICES:
            raise ConfigError(f"data.sampling: {self.sampling!r} is not one of "
                              f"{list(SAMPLING_CHOICES)}")
        check_sources(self)   # single_source needs >= 2 sources; specs; no repeats; retrieval


@dataclass(kw_only=True)


class ModelConfig:
    arch: str = "dual_encoder"
    """Model family (``vlmray.models.MODEL_ARCHS``): ``dual_encoder`` (CLIP's two towers) or a
    single-tower variant registered there."""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    """The arch's own settings (FIBER's fusion depth, SegCLIP's centres); checked per arch."""
    vision: str = "vit_tiny_patch16_224"
    """Any timm model name; built with ``num_classes=0`` and the kwargs below."""
    vision_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "patch_size": 8, "embed_dim": 128, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0})
    """Extra keyword arguments for ``timm.create_model`` (``img_size`` is set from data)."""
    vision_weights: str = ""
    """Local path of a state dict for the vision tower (empty: random init)."""
    text: dict[str, Any] = field(default_factory=lambda: {
        "model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256})
    """A transformers encoder config (``model_type`` plus fields); vocab and positions are set
    from the tokenizer."""
    text_weights: str = ""
    """Local directory of a transformers model for the text tower (empty: random init)."""
    text_pooling: Literal["mean", "first"] = "mean"
    """How token states become one text vector: masked mean, or the first (BOS/CLS) token."""
    embed_dim: int = 128
    """Width of the shared image-text embedding space."""
    init_temperature: float = 0.07
    """Initial softmax temperature; the learnable logit scale starts at 1/this."""
    max_logit_scale: float = 100.0
    """The logit scale is clamped to at most this."""
    init_logit_bias: float | None = None
    """Initial value of a learnable logit bias b (``Outputs.logit_bias``); None = no bias
    parameter. SigLIP uses -10."""
    ra_layers: int = 0
    """RA-CLIP retrieval augmentation: cross-attention blocks of the module that enriches each
    image embedding with its k retrieved reference pairs (0 = off). When on, training batches
    must carry ``ref_image_embeds``, ``ref_text_embeds`` and ``ref_mask``."""
    ra_heads: int = 4
    """Attention heads of the retrieval augmentation blocks; must divide ``embed_dim``."""
    ra_ref_dim: int = 0
    """Width D_ref of the reference embeddings (the frozen embedder of the retrieval index);
    must be > 0 when ``ra_layers > 0`` (pipelines fill it in from the index)."""

    def __post_init__(self) -> None:
        check_bounds("model", self, MODEL_BOUNDS)


@dataclass(kw_only=True)


class TrainConfig:
    steps: int = 300
    """Optimiser steps in the whole run."""
    batch_size: int = 128
    """Global batch size (split evenly across workers)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases, norms, embeddings-of-scale)."""
    warmup_steps: int = 30
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """Cosine decays to ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    num_workers: int = 0
    """Ray Train workers; 0 = one per GPU in the cluster, or 1 on a CPU-only cluster."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves (fractional so Ray Data is never starved)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom Ray resources each worker requests (e.g. ``{"trainer_slot": 1}`` to place
    one worker per node that offers one slot)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """``auto`` uses GPUs when the cluster has them."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU."""
    torch_threads: int = 0
    """Intra-op threads per CPU worker; 0 = the node's cores divided among its workers."""
    log_every: int = 10
    """Steps between metric reports."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints Ray Train keeps."""
    max_failures: int = 0
    """Worker-group restarts Ray Train attempts (restoring from the last checkpoint)."""
    max_bad_steps: int = 10
    """A step whose loss or gradient is not finite on any worker is skipped (no update,
    counted in ``skipped_steps``); this many in a row stop the run with an error."""
    seed: int = 0
    """Seeds model init and data order."""

    def __post_init__(self) -> None:
        check_bounds("train", self, TRAIN_BOUNDS)
        if self.lr * self.weight_decay >= 1.0:
            raise ConfigError(f"train.lr * train.weight_decay must be < 1 (AdamW scales every "
                              f"weight by 1 - lr * weight_decay a step), got {self.lr} * "
                              f"{self.weight_decay}")
        bad = {k: v for k, v in self.worker_resources.items()
               if isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v) or v < 0}
        if bad:
            raise ConfigError(f"train.worker_resources: each amount must be a finite number "
                              f">= 0, got {bad}")


@dataclass(kw_only=True)


class EvalConfig:
    every: int = 100
    """Steps between held-out evaluations (0: only at the end)."""
    max_samples: int = 1000
    """Held-out rows used for zero-shot and retrieval."""
    batch_size: int = 256
    """Rows per forward pass during evaluation."""

    def __post_init__(self) -> None:
        check_bounds("eval", self, EVAL_BOUNDS)


@dataclass(kw_only=True)


class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec(name="clip")])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = ""
    """The recipe this config came from (informational)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        data = d.get("data")
        if isinstance(data, dict) and "stream" in data:   # runs before streaming was the rule
            d = {**d, "data": {k: v for k, v in data.items() if k != "stream"}}
        return dataclass_from_dict(cls, d)


__all__ = ["DATA_BOUNDS", "EVAL_BOUNDS", "EXTRA_TEXT_CHOICES", "MODEL_BOUNDS", "SAMPLING_CHOICES",
           "TRAIN_BOUNDS", "Bound", "Config", "DataConfig", "EvalConfig", "ModelConfig",
           "TrainConfig", "check_bounds", "check_extra_texts"]
