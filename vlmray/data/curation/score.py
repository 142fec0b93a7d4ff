"""Image-text agreement: DataComp's CLIP-score filter, with this project's models or a CLIP.

A dual encoder embeds each live row's image and caption; ``CLIP_SCORE`` is the cosine of the
two L2-normalised embeddings. :class:`ScoreStage` writes it (and rejects rows under
``min_score``); :class:`TopFraction` keeps the best ``keep_top_fraction`` of the live rows.

The model is a vlmray run or checkpoint directory (local or ``s3://``; the latest checkpoint
under it), rebuilt from its ``config.json`` and fed exactly as in training, or ``hf:<dir>``: a
local ``transformers`` CLIP model with its tokenizer. Nothing is downloaded.

    stage = ScoreStage(ScoreConfig(model="runs/a", min_score=0.2, actors=2, num_gpus=0.5))
    batch = stage(batch)                     # or apply_stage(ds, stage) on Ray Data
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Decisions, GlobalStage, Resources, Stage, StageOutput
from vlmray.data.decode import DecodeSpec, decode_image
from vlmray.data.storage import filesystem, is_remote, join

LOW_CLIP_SCORE = "low_clip_score"
BELOW_TOP_FRACTION = "below_top_fraction"
REASONS = (LOW_CLIP_SCORE, BELOW_TOP_FRACTION)

HF_PREFIX = "hf:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(kw_only=True)
class ScoreConfig:
    """The scoring model, the filters on its score, and how the stage is scheduled."""

    model: str = ""
    """"" = scoring off; a vlmray run or checkpoint directory (local or ``s3://``; the latest
    checkpoint under it is used), or ``hf:<local dir>`` holding a ``transformers`` CLIP model
    with its tokenizer."""
    min_score: float = -2.0
    """Reject rows whose cosine score is below this (``low_clip_score``); below -1 = off."""
    keep_top_fraction: float = 1.0
    """Keep only this fraction of live rows, best scores first (DataComp's top-30% is 0.3);
    1.0 = off. Decided over the whole dataset, after deduplication."""
    batch_size: int = 64
    """Rows per model forward pass (and per Ray Data batch)."""
    actors: int = 1
    """Scoring actors; each loads the model once."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (fractional shares a GPU); 0 = CPU actors."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when the actor sees a GPU, else CPU."""

    def __post_init__(self) -> None:
        if self.min_score > 1.0:
            raise ValueError(f"ScoreConfig.min_score must be <= 1 (a cosine), got "
                             f"{self.min_score}")
        if not 0.0 < self.keep_top_fraction <= 1.0:
            raise ValueError(f"ScoreConfig.keep_top_fraction must be in (0, 1], got "
                             f"{self.keep_top_fraction}")
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise ValueError(f"ScoreConfig.num_gpus must be >= 0, got {self.num_gpus}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"ScoreConfig.device must be one of auto, cpu, cuda; "
                             f"got {self.device!r}")
        if self.num_gpus > 0 and self.device == "cpu":
            raise ValueError("ScoreConfig.num_gpus > 0 reserves GPUs that device='cpu' won't use")
        if not self.model and (self.min_score >= -1.0 or self.keep_top_fraction < 1.0):
            raise ValueError("ScoreConfig.min_score / keep_top_fraction need a scoring model "
                             "(ScoreConfig.model is empty)")

    @property
    def enabled(self) -> bool:
        return bool(self.model)


# --- where the model comes from ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``ScoreConfig.model``: the backend, its directory and its (small) config."""

    kind: Literal["vlmray", "hf"]
    path: str
    config: dict[str, Any]


def resolve_model(spec: str) -> ModelSource:
    """Finds and checks the model named by ``spec``, loading nothing heavy; raises with what
    was expected when it is missing or not a model."""
    if spec.startswith(HF_PREFIX):
        return _resolve_hf(spec[len(HF_PREFIX):])
    from vlmray.config import Config
    from vlmray.train.checkpoint import CONFIG, find_latest

    try:
        ckpt = find_latest(spec) if spec else None
    except FileNotFoundError:
        ckpt = None
    if ckpt is None:
        raise FileNotFoundError(
            f"score.model {spec!r}: no vlmray checkpoint (a directory with state.pt and "
            f"progress.json) at or under it; give a run or checkpoint directory (local or "
            f"s3://), or '{HF_PREFIX}<local dir>' for a transformers CLIP model")
    fs, path = filesystem(join(str(ckpt), CONFIG))
    try:
        config = json.loads(fs.cat_file(path))
        Config.from_dict(config)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"score.model: {ckpt}/{CONFIG} is not a vlmray config: {e}") from e
    return ModelSource("vlmray", str(ckpt), config)


def _resolve_hf(path: str) -> ModelSource:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"score.model '{HF_PREFIX}{path}': not a local directory")
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"score.model '{HF_PREFIX}{path}': no readable config.json "
                                f"(save the model with save_pretrained): {e}") from e
    if config.get("model_type") != "clip":
        raise ValueError(f"score.model '{HF_PREFIX}{path}': model_type is "
                         f"{config.get('model_type')!r}; only 'clip' (transformers.CLIPModel) "
                         f"is supported")
    if not any((root / f).is_file() for f in _HF_TOKENIZER_FILES):
        raise FileNotFoundError(f"score.model '{HF_PREFIX}{path}': no tokenizer (one of "
                                f"{list(_HF_TOKENIZER_FILES)}); save it next to the model")
    return ModelSource("hf", str(root), config)


# --- backends ----------------------------------------------------------------------------------


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


def _torch_device(choice: str) -> Any:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this worker sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


@contextlib.contextmanager
def _local_checkpoint(path: str) -> Iterator[str]:
    """``path`` itself when local; else its state and config copied to a temporary directory
    (removed afterwards)."""
    if not is_remote(path):
        yield path
        return
    from vlmray.train.checkpoint import CONFIG, STATE

    with tempfile.TemporaryDirectory(prefix="vlmray-score-") as local:
        for name in (STATE, CONFIG):
            fs, remote = filesystem(join(path, name))
            fs.get(remote, str(Path(local) / name))
        yield local


class VlmrayEmbedder:
    """A vlmray checkpoint, rebuilt from its config; inputs prepared exactly as in training."""

    def __init__(self, source: ModelSource, device: Any) -> None:
        from vlmray.config import Config
        from vlmray.data.ingest import decode_spec, tokenizer_for
        from vlmray.train.checkpoint import load_checkpoint
        from vlmray.train.state import build_core_model

        cfg = Config.from_dict(source.config)
        self.model = build_core_model(cfg)
        with _local_checkpoint(source.path) as local:
            load_checkpoint(local, model=self.model)
        self.model.to(device).eval()
        self.device = device
        self.spec = decode_spec(cfg.data)
        self.tokenizer = tokenizer_for(cfg.data)

    def preprocess(self, data: bytes) -> np.ndarray | None:
        return decode_image(data, self.spec)[0]                    # uint8 (3, S, S)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        emb = self.model.encode_image(torch.from_numpy(pixels).to(self.device))[0]
        return emb.float().cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        ids, mask = self.tokenizer(texts)
        emb = self.model.encode_text(torch.from_numpy(ids).to(self.device),
                                     torch.from_numpy(mask).to(self.device))[0]
        return emb.float().cpu().numpy()


class HFClipEmbedder:
    """A local ``transformers`` CLIP: resize the shorter side and centre-crop to the vision
    config's ``image_size``, normalise with the processor's mean/std (CLIP's when there is no
    ``preprocessor_config.json``); captions truncated to the text positions."""

    def __init__(self, source: ModelSource, device: Any) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(source.path, local_files_only=True)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        self.device = device
        vision, text = self.model.config.vision_config, self.model.config.text_config
        self.spec = DecodeSpec(image_size=vision.image_size, min_image_side=1)
        self.max_length = text.max_position_embeddings
        mean, std = _normalisation(Path(source.path))
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def preprocess(self, data: bytes) -> np.ndarray | None:
        pixels = decode_image(data, self.spec)[0]
        if pixels is None:
            return None
        return (pixels.astype(np.float32) / 255.0 - self.mean) / self.std   # (3, S, S)

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        out = self.model.vision_model(pixel_values=torch.from_numpy(pixels).to(self.device),
                                      return_dict=True)
        return self.model.visual_projection(out.pooler_output).float().cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device),
                                    return_dict=True)
        return self.model.text_projection(out.pooler_output).float().cpu().numpy()


def _normalisation(root: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        doc = json.loads((root / "preprocessor_config.json").read_text())
        return tuple(doc["image_mean"]), tuple(doc["image_std"])
    except (OSError, ValueError, KeyError):
        return CLIP_MEAN, CLIP_STD


EMBEDDERS: dict[str, type] = {"vlmray": VlmrayEmbedder, "hf": HFClipEmbedder}


def load_embedder(source: ModelSource, device: str = "auto") -> Embedder:
    """Loads the model of ``source`` on ``device`` (``auto``/``cpu``/``cuda``), in eval mode."""
    return EMBEDDERS[source.kind](source, _torch_device(device))


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
    Subclasses set ``cfg`` (with ``num_gpus`` and ``device``) and ``source``."""

    _embedder: Embedder | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedder"], state["_ready"] = None, False            # ship it light
        return state

    def setup(self) -> None:
        cfg = self.cfg  # type: ignore[attr-defined]
        device = "cuda" if cfg.num_gpus > 0 and cfg.device == "auto" else cfg.device
        self._embedder = load_embedder(self.source, device)  # type: ignore[attr-defined]


class ScoreStage(ModelStage):
    """Writes ``CLIP_SCORE`` for live rows; rejects ``low_clip_score`` under ``min_score``.

    Construction resolves and checks the model (a bad path fails here, before any work); the
    model itself loads in :meth:`setup`, once per actor. Rows whose image does not decode (an
    earlier stage should have rejected them) score NaN, which is below any ``min_score``.
    """

    name: ClassVar[str] = "score"
    reasons: ClassVar[tuple[str, ...]] = (LOW_CLIP_SCORE,)
    fills: ClassVar[dict[str, Any]] = {schema.CLIP_SCORE: float("nan")}

    def __init__(self, cfg: ScoreConfig) -> None:
        if not cfg.model:
            raise ValueError("ScoreStage needs ScoreConfig.model (empty means scoring is off; "
                             "check ScoreConfig.enabled before adding the stage)")
        self.cfg = cfg
        self.source = resolve_model(cfg.model)
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


__all__ = ["BELOW_TOP_FRACTION", "CLIP_MEAN", "CLIP_STD", "EMBEDDERS", "HF_PREFIX", "ModelStage",
           "LOW_CLIP_SCORE", "REASONS", "Embedder", "HFClipEmbedder", "ModelSource",
           "ScoreConfig", "ScoreStage", "TopFraction", "VlmrayEmbedder", "cosine_scores",
           "load_embedder", "resolve_model"]
