"""Image-text agreement: DataComp's CLIP-score filter, with this project's models or a CLIP.

A dual encoder embeds each live row's image and caption; ``CLIP_SCORE`` is the cosine of the
two L2-normalised embeddings. :class:`ScoreStage` writes it (and rejects rows under
``min_score``); :class:`TopFraction` keeps the best ``keep_top_fraction`` of the live rows.

The model (a vlmray run or checkpoint, or ``hf:<dir>``: a local ``transformers`` CLIP) is
resolved by ``vlmray.embedders.resolve_model`` in the code that composes the plan and handed to
the stage, which loads it once per worker.

    cfg = ScoreConfig(model="runs/a", min_score=0.2, actors=2, num_gpus=0.5)
    stage = ScoreStage(cfg, resolve_model(cfg.model))
    batch = stage(batch)                     # or apply_stage(ds, stage) on Ray Data
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import numpy as np

from vlmray.config.curation import ScoreConfig
from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Decisions, GlobalStage, Resources, Stage, StageOutput

LOW_CLIP_SCORE = "low_clip_score"
BELOW_TOP_FRACTION = "below_top_fraction"
REASONS = (LOW_CLIP_SCORE, BELOW_TOP_FRACTION)

class Embedder(Protocol):
    """What scoring needs from a model: image preprocessing and the two embeddings."""

    def preprocess(self, data: bytes) -> np.ndarray | None:
        """Encoded image -> (3, S, S) model input, or None when it cannot be decoded."""
        ...

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, D) float embeddings."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """B captions -> (B, D) float embeddings."""
        ...


class EmbedderSource(Protocol):
    """A resolved model a stage can carry to its workers and load there."""

    def load(self, device: str = "auto") -> Embedder:
        """The model on ``device`` (``auto``/``cpu``/``cuda``), in eval mode."""
        ...


def cosine_scores(embedder: Embedder, images: list[bytes], texts: list[str], *,
                  batch_size: int = 64) -> np.ndarray:
    """float64 cosine of each (image, caption) pair's embeddings; NaN where the image does not
    decode."""
    import torch

    scores = np.full(len(images), np.nan, dtype=np.float64)
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            pix = [embedder.preprocess(b) for b in images[lo:lo + batch_size]]
            ok = np.flatnonzero([p is not None for p in pix])
            if not len(ok):
                continue
            img = _unit(embedder.embed_images(np.stack([pix[i] for i in ok])))   # (B, D)
            txt = _unit(embedder.embed_texts([texts[lo + i] for i in ok]))          # (B, D)
            scores[lo + ok] = np.clip((img * txt).sum(axis=1), -1.0, 1.0)
    return scores


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _as_text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


# --- stages ------------------------------------------------------------------------------------


class ModelStage(Stage):
    """A stage that runs an :class:`Embedder`: it ships without the model (each worker loads
    its own in :meth:`setup`, once), on CUDA when it reserves GPUs and its device is ``auto``.
    Subclasses set ``cfg`` (with ``num_gpus`` and ``device``) and ``source``: a resolved model
    (:class:`EmbedderSource`, e.g. ``vlmray.embedders.ModelSource``) handed in by the code that
    composes the plan, so this layer never imports the model code."""

    _embedder: Embedder | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedder"], state["_ready"] = None, False            # ship it light
        return state

    def setup(self) -> None:
        cfg = self.cfg  # type: ignore[attr-defined]
        device = "cuda" if cfg.num_gpus > 0 and cfg.device == "auto" else cfg.device
        self._embedder = self.source.load(device)  # type: ignore[attr-defined]


class ScoreStage(ModelStage):
    """Writes ``CLIP_SCORE`` for live rows; rejects ``low_clip_score`` under ``min_score``.

    ``source`` is the scoring model, already resolved and checked by the composing code
    (``vlmray.embedders.resolve_model(cfg.model)``: a bad path fails there, before any work);
    the model itself loads in :meth:`setup`, once per actor. Rows whose image does not decode
    (an earlier stage should have rejected them) score NaN, which is below any ``min_score``.
    """

    name: ClassVar[str] = "score"
    reasons: ClassVar[tuple[str, ...]] = (LOW_CLIP_SCORE,)
    fills: ClassVar[dict[str, Any]] = {schema.CLIP_SCORE: float("nan")}

    def __init__(self, cfg: ScoreConfig, source: EmbedderSource) -> None:
        if not cfg.model:
            raise ValueError("ScoreStage needs ScoreConfig.model (empty means scoring is off; "
                             "check ScoreConfig.enabled before adding the stage)")
        self.cfg = cfg
        self.source = source
        self.resources = Resources(num_cpus=1.0, num_gpus=cfg.num_gpus, actors=cfg.actors,
                                   batch_size=cfg.batch_size, model=True)
        self._embedder: Embedder | None = None

    def process(self, batch: Batch) -> StageOutput:
        if self._embedder is None:
            self.setup()
        assert self._embedder is not None
        texts = [_as_text(t) for t in batch[schema.TEXT]]
        scores = cosine_scores(self._embedder, list(batch[schema.IMAGE]), texts,
                               batch_size=self.cfg.batch_size)
        reasons = None
        if self.cfg.min_score >= -1.0:
            low = ~(scores >= self.cfg.min_score)                     # NaN counts as low
            reasons = np.where(low, LOW_CLIP_SCORE, "").astype(object)
        return StageOutput(columns={schema.CLIP_SCORE: scores}, reasons=reasons)


class TopFraction(GlobalStage):
    """Keeps the ``keep_top_fraction`` best-scoring live rows: ceil(fraction * n), ranked by
    score (NaN lowest), ties to the earlier ``ROW_ID``; the rest get ``below_top_fraction``."""

    name: ClassVar[str] = "score_top_fraction"
    reasons: ClassVar[tuple[str, ...]] = (BELOW_TOP_FRACTION,)
    columns: ClassVar[tuple[str, ...]] = (schema.CLIP_SCORE,)

    def __init__(self, cfg: ScoreConfig) -> None:
        self.fraction = cfg.keep_top_fraction

    def enabled(self) -> bool:
        return self.fraction < 1.0

    def decide(self, table: Batch) -> Decisions:
        ids = np.asarray(table[schema.ROW_ID], dtype=np.int64)
        scores = np.asarray(table[schema.CLIP_SCORE], dtype=np.float64)
        scores = np.where(np.isnan(scores), -np.inf, scores)
        order = np.lexsort((ids, -scores))                  # best first; ties: earlier row
        keep = min(len(ids), math.ceil(self.fraction * len(ids) - 1e-9))
        drop = ids[order[keep:]]
        return Decisions(row_ids=drop, reasons=np.full(len(drop), BELOW_TOP_FRACTION, object))


__all__ = ["BELOW_TOP_FRACTION", "LOW_CLIP_SCORE", "REASONS", "Embedder", "EmbedderSource",
           "ModelStage", "ScoreStage", "TopFraction", "cosine_scores"]
