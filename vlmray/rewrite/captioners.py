"""Captioners: a synthetic caption per image (ALIP's second text), as Ray Data stages.

Each adds ``RAW_CAPTION`` (str) and ``CAPTION_TOKENS`` (int64) to every row and carries every
other column; no row is added or lost (``vlmray.rewrite.base.Captioner``).

* ``oracle`` (:class:`OracleCaptioner`): the built-in data's generator acting as a perfect
  captioner. It reads each row's JSON sidecar (``META``: shape, colour, count, size and object
  positions, written by :mod:`vlmray.data.synthetic`) and describes the TRUE scene in its own
  wording, so a row whose web caption was swapped for another image's (``noise ==
  "mismatch"``) still gets a correct synthetic caption. It exists for the built-in data only:
  no real captioner ships offline. Rows without those sidecar fields get "" (the validator
  falls back to the original caption).
* ``transformers`` (:class:`HFCaptioner`, :class:`TransformersCaptioner`): any local
  image-to-text transformers model directory (``rewrite.captioner_model``): a
  VisionEncoderDecoderModel, BLIP, GIT... (``AutoModelForImageTextToText`` models whose
  ``generate`` takes ``pixel_values`` alone), with its image processor and tokenizer, in a
  Ray Data actor pool (``concurrency`` actors, each ``num_cpus`` / ``num_gpus``,
  ``batch_size`` images per call), decoding with ``rewrite.sampling``.

    captions = HFCaptioner(cfg).caption([jpeg_bytes, ...])     # [(text, n_tokens), ...]
    ds = captioner(cfg).apply(ds)                              # + _caption, _caption_tokens
"""

from __future__ import annotations

import io
import json
import os
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmray.config.rewrite import RewriteConfig
from vlmray.data import schema
from vlmray.rewrite.base import CAPTION_TOKENS, RAW_CAPTION, Captioner, register_captioner

if TYPE_CHECKING:
    import ray.data

Batch = dict[str, np.ndarray]

# --- oracle: the built-in generator describes its own scenes -----------------------------------

_COUNTS = {1: ("one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a group of three")}
_SIZES = {"small": ("small", "little"), "large": ("large", "big")}
_ORACLE = (
    "{n} {size} {colour} {shapes} {where}",
    "a rendering of {n} {size} {colour} {shapes} {where}",
    "{n} {size} {colour} {shapes} drawn {where} on a light backdrop",
    "a simple scene with {n} {size} {colour} {shapes} {where}",
)


def _plural(noun: str, count: int) -> str:
    if count == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(objects: list[list[float]]) -> str:
    """Where the objects sit, from their mean centre (normalised (cx, cy, r) each)."""
    cx = float(np.mean([o[0] for o in objects]))
    cy = float(np.mean([o[1] for o in objects]))
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "toward the left" if dx < 0 else "toward the right"
    return "toward the top" if dy < 0 else "toward the bottom"


def oracle_caption(meta: str | bytes | dict, key: str, seed: int = 0) -> str:
    """A clean description of the true scene in ``meta`` (a built-in sidecar), worded by a
    generator seeded with (``seed``, ``key``); "" when the sidecar lacks the scene fields."""
    try:
        info = json.loads(meta) if isinstance(meta, (str, bytes)) else meta
        shape, count = str(info["shape"]), int(info["count"])
        colour = str(info["classname"]).split()[0]
        size, objects = str(info["size"]), list(info["objects"])
    except (ValueError, KeyError, TypeError, IndexError):
        return ""
    if count not in _COUNTS or size not in _SIZES or not objects:
        return ""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    text = _pick(rng, _ORACLE).format(n=_pick(rng, _COUNTS[count]),
                                      size=_pick(rng, _SIZES[size]), colour=colour,
                                      shapes=_plural(shape, count), where=_where(objects))
    return " ".join(text.split())


def oracle_batch(batch: Batch, seed: int = 0) -> Batch:
    """``batch`` plus RAW_CAPTION and CAPTION_TOKENS (words written) from KEY and META."""
    keys, metas = batch[schema.KEY], batch[schema.META]
    texts = [oracle_caption(m, str(k), seed) for k, m in zip(keys, metas)]
    out = dict(batch)
    out[RAW_CAPTION] = np.asarray(texts, dtype=object)
    out[CAPTION_TOKENS] = np.asarray([len(t.split()) for t in texts], dtype=np.int64)
    return out


@register_captioner("oracle")
class OracleCaptioner(Captioner):
    """The built-in data's generator as a perfect captioner (built-in data only; see the
    module docstring). Reads KEY and META; deterministic given ``sampling.seed``."""

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(oracle_batch, fn_kwargs={"seed": self.cfg.sampling.seed},
                              batch_format="numpy", batch_size=self.cfg.batch_size * 16)


# --- transformers: a local image-to-text model -------------------------------------------------


def check_captioner_model(path: str) -> None:
    """Clear errors before any work: ``path`` must be a local directory holding an
    image-to-text transformers model (config.json of an ``AutoModelForImageTextToText``
    type), its image processor and its tokenizer."""
    if not path:
        raise ValueError("rewrite.captioner='transformers' needs rewrite.captioner_model: a "
                         "local image-to-text model directory")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"rewrite.captioner_model={path!r}: not a directory with "
                                "config.json (a local transformers model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"rewrite.captioner_model={path!r} is a {model_type!r} model, not an "
                         "image-to-text one (e.g. vision-encoder-decoder, blip, git)")
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(f"rewrite.captioner_model={path!r} has no image processor "
                                "(preprocessor_config.json); save it with the model")
    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise FileNotFoundError(f"rewrite.captioner_model={path!r} has no tokenizer; save it "
                                "with the model")


class HFCaptioner:
    """A local image-to-text model, loaded once: ``caption(images)`` -> [(text, n_tokens)].

    ``n_tokens`` counts the generated tokens that are not special (start, end, padding).
    Images that fail to decode get ("", 0). Sampling (``sampling.temperature > 0``) reseeds
    torch with ``sampling.seed`` before every call, so a given batch is reproducible.
    """

    def __init__(self, cfg: RewriteConfig) -> None:
        check_captioner_model(cfg.captioner_model)
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.cfg = cfg
        path = cfg.captioner_model
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available()
                                   else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.special = set(self.tokenizer.all_special_ids)

    def caption(self, images: list[bytes]) -> list[tuple[str, int]]:
        """(text, generated non-special tokens) per image (JPEG/PNG bytes), in order."""
        import torch
        from PIL import Image

        decoded: list[Any] = []
        for data in images:
            try:
                decoded.append(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
            except Exception:                       # truncated / garbage bytes: no caption
                decoded.append(None)
        ok = [i for i, im in enumerate(decoded) if im is not None]
        result: list[tuple[str, int]] = [("", 0)] * len(images)
        if not ok:
            return result
        pixels = self.processor([decoded[i] for i in ok], return_tensors="pt").pixel_values
        s = self.cfg.sampling
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "do_sample": s.temperature > 0,
                                  "repetition_penalty": s.repetition_penalty}
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
            torch.manual_seed(s.seed)
        with torch.no_grad():
            ids = self.model.generate(pixel_values=pixels.to(self.device), **kwargs).cpu()
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, row, text in zip(ok, ids.tolist(), texts):
            result[i] = (" ".join(text.split()), sum(t not in self.special for t in row))
        return result


class _CaptionActor:
    """One Ray Data actor of the pool: loads the model once, captions batches of IMAGE."""

    def __init__(self, cfg: RewriteConfig) -> None:
        self.captioner = HFCaptioner(cfg)

    def __call__(self, batch: Batch) -> Batch:
        found = self.captioner.caption(list(batch[schema.IMAGE]))
        out = dict(batch)
        out[RAW_CAPTION] = np.asarray([t for t, _ in found], dtype=object)
        out[CAPTION_TOKENS] = np.asarray([n for _, n in found], dtype=np.int64)
        return out


@register_captioner("transformers")
class TransformersCaptioner(Captioner):
    """A local image-to-text transformers model in a Ray Data actor pool (module docstring)."""

    def check(self) -> None:
        check_captioner_model(self.cfg.captioner_model)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        cfg = self.cfg
        kwargs: dict[str, Any] = {"batch_format": "numpy", "batch_size": cfg.batch_size,
                                  "num_cpus": cfg.num_cpus, "concurrency": cfg.concurrency}
        if cfg.num_gpus:
            kwargs["num_gpus"] = cfg.num_gpus
        return ds.map_batches(_CaptionActor, fn_constructor_args=(cfg,), **kwargs)


__all__ = ["HFCaptioner", "OracleCaptioner", "TransformersCaptioner", "check_captioner_model",
           "oracle_batch", "oracle_caption"]
