"""Training rows from raw rows: the decode stage (decode + validate + tokenise, the reason of
each rejected row) and what it is built from (``decode_spec``, ``tokenizer_for``), the training
columns a config asks for, and the shard reader. ``vlmray.pipelines.feed`` composes them, with
curation, rewrite and retrieval stages, into the streamed training feed; evaluation, the
embedders and the tests build the same inputs with them.

    spec, tokenizer = decode_spec(cfg.data), tokenizer_for(cfg.data)
    ds = read_shards("s3://bucket/ds/train").map_batches(DecodeStage(cfg.data), batch_format="numpy")
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from vlmray.config.data import PlacementConfig
from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.readers import read_inputs
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.stream import FALLBACK_COLUMNS
from vlmray.data.tokenize import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig

TRAIN_COLUMNS = [schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.LABEL]
REFERENCE_COLUMNS = [schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK]
NN_COLUMNS = [schema.NN_TOKENS, schema.NN_TOKEN_MASK]
REGION_COLUMNS = [schema.REGION_BOXES, schema.REGION_SPANS, schema.REGION_MASK]
EXTRA_TEXT_COLUMNS = {"texts_aug": [schema.TOKENS_AUG, schema.TOKEN_MASK_AUG],
                      "synthetic_caption": [schema.SYNTHETIC_TOKENS, schema.SYNTHETIC_TOKEN_MASK]}
"""``data.extra_texts`` entry -> the token columns the decode stage adds for it."""
def train_columns(cfg: DataConfig) -> list[str]:
    """The columns training rows carry: TRAIN_COLUMNS plus what ``data.retrieval`` attaches,
    the region columns when ``data.regions > 0``, the token columns of ``data.extra_texts``,
    and the caption string when ``data.views`` derives texts or renders it."""
    extra = {"references": REFERENCE_COLUMNS, "neighbour_text": NN_COLUMNS}
    text = [schema.TEXT] if cfg.views.needs_text else []   # the views stage reads, then drops it
    regions = REGION_COLUMNS if cfg.regions > 0 else []
    texts = [c for name in cfg.extra_texts for c in EXTRA_TEXT_COLUMNS[name]]
    return TRAIN_COLUMNS + extra.get(cfg.retrieval.attach, []) + regions + texts + text


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str, vocab_size: int, context_length: int) -> Tokenizer:
    """One tokenizer per worker process (the stage's setup), reused across batches."""
    return build_tokenizer(name, vocab_size=vocab_size, context_length=context_length)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    return cached_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.context_length)


def decode_spec(cfg: DataConfig) -> DecodeSpec:
    return DecodeSpec(image_size=cfg.image_size, min_image_side=cfg.min_image_side,
                      max_text_chars=cfg.max_text_chars, regions=cfg.regions,
                      texts_aug=cfg.max_texts_aug if "texts_aug" in cfg.extra_texts else 0,
                      synthetic_caption="synthetic_caption" in cfg.extra_texts)


DECODE_STAGE = "decode"
DECODE_CPUS, SPLIT_CPUS = 0.5, 0.25
"""Per task. Data tasks run beside the training workers (0.5 CPU each on a CPU node) and the
actors of retrieval stages, which hold their CPUs for the whole run: whole-core tasks could
never be scheduled on a 2-core node then, and the stream would wait forever."""
_PASS_THROUGH = (schema.ROW_ID, schema.LANE_POS, schema.SHA256, schema.PHASH, schema.TEXT_SIG,
                 schema.CLIP_SCORE, schema.DUPLICATE_OF, schema.SOURCE, schema.URL,
                 schema.REPAIRS, *REFERENCE_COLUMNS, *FALLBACK_COLUMNS)
# SOURCE, URL, DUPLICATE_OF, REPAIRS: for the rejects file (vlmray.data.stream.SplitStage)


class DecodeStage:
    """Ray Data batch function: raw rows (KEY, IMAGE, TEXT, META) -> decoded, tokenised, with
    reject reasons. Rows an earlier curation stage rejected keep their reason and stage.
    ``data.extra_texts`` are tokenised from the rewrite prefix's TEXTS_AUG / SYNTHETIC_CAPTION
    columns when the rows have them, else from the sidecars; the prefix's fallback columns
    pass through for :func:`run_ingest`'s counts.

    Holds only light, picklable settings (no torch), so Ray Data workers start fast.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.spec = decode_spec(cfg)
        self.tokenizer_args = (cfg.tokenizer, cfg.vocab_size, cfg.context_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch[schema.KEY]
        none = [None] * len(keys)
        out = prepare_rows(keys, batch.get(schema.IMAGE, none), batch.get(schema.TEXT, none),
                           batch.get(schema.META, none), self.spec,
                           cached_tokenizer(*self.tokenizer_args),
                           texts_aug=batch.get(schema.TEXTS_AUG),
                           synthetic=batch.get(schema.SYNTHETIC_CAPTION))
        reason = out[schema.REJECT_REASON]
        stage = np.where(reason != "", DECODE_STAGE, "").astype(object)
        prior = batch.get(schema.REJECT_REASON)
        if prior is not None:
            earlier = prior != ""
            reason[earlier] = prior[earlier]
            stage[earlier] = batch[schema.REJECT_STAGE][earlier]
        out[schema.REJECT_STAGE] = stage
        out.update({c: batch[c] for c in _PASS_THROUGH if c in batch})
        if schema.REWRITE_FALLBACKS in batch:   # Python lists: Arrow list<string>, not pickles
            out[schema.REWRITE_FALLBACKS] = _str_lists(batch[schema.REWRITE_FALLBACKS])
        if schema.NN_TEXT in batch:   # DeCLIP NNS: the neighbour's caption, tokenised alike
            nn_text = [t if isinstance(t, str) else "" for t in batch[schema.NN_TEXT]]
            tok = cached_tokenizer(*self.tokenizer_args)
            out[schema.NN_TOKENS], out[schema.NN_TOKEN_MASK] = tok(nn_text)
        return out


def _str_lists(column: np.ndarray) -> np.ndarray:
    """An object column of per-row sequences (NumPy arrays after an Arrow round trip) -> an
    object array of Python lists of str, which Ray Data stores as Arrow ``list<string>``."""
    out = np.empty(len(column), dtype=object)
    for i, value in enumerate(column):
        out[i] = [] if value is None else [str(v) for v in value]
    return out


def read_shards(uri: str, placement: PlacementConfig | None = None) -> ray.data.Dataset:
    """Raw rows (undecoded bytes, with ``ROW_ID``) from shard files, local or s3://."""
    return read_inputs(uri, ReadConfig(), placement)


__all__ = ["DECODE_CPUS", "DecodeStage", "EXTRA_TEXT_COLUMNS", "REGION_COLUMNS", "SPLIT_CPUS",
           "TRAIN_COLUMNS", "decode_spec", "read_shards", "tokenizer_for", "train_columns"]
