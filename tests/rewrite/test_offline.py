"""The offline (EDA-style) backend: deterministic, meaning-keeping paraphrases, and the stage's
prepare -> backend -> validate batch functions in plain Python (no Ray).

    pytest tests/rewrite/test_offline.py -q
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from vlmray.config.data import SyntheticConfig
from vlmray.config.rewrite import RewriteConfig, SamplingConfig, ValidateConfig
from vlmray.data import schema
from vlmray.data.synthetic import COLOURS, SHAPES, make_sample
from vlmray.rewrite.base import (
    CAPTION_TOKENS,
    RAW_CAPTION,
    REWRITE_BACKENDS,
    raw_column,
    rewrite_backend,
    tokens_column,
)
from vlmray.rewrite.offline import OfflineBackend, attribute, paraphrase, paraphrase_batch, reorder
from vlmray.rewrite.prompts import LaClipPrompts
from vlmray.rewrite.stage import (
    CAPTION_TOKENS_OUT,
    REWRITE_TOKENS,
    prepare_batch,
    validate_batch,
)
from vlmray.rewrite.validate import normalise

CAPTIONS = [make_sample(SyntheticConfig(num_train=40), "train", i)[schema.TEXT]
            for i in range(40)]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_registered_and_built_by_name() -> None:
    assert isinstance(rewrite_backend(RewriteConfig(k=1)), OfflineBackend)
    assert REWRITE_BACKENDS["offline"] is OfflineBackend


def test_same_seed_key_slot_same_rewrite() -> None:
    for i, c in enumerate(CAPTIONS[:10]):
        a = [paraphrase(c, seed=3, key=f"k{i}", slot=j) for j in range(3)]
        assert a == [paraphrase(c, seed=3, key=f"k{i}", slot=j) for j in range(3)]
    by_seed = {s: [paraphrase(c, seed=s, key="k", slot=0) for c in CAPTIONS] for s in (0, 1)}
    by_slot = [paraphrase(c, seed=0, key="k", slot=1) for c in CAPTIONS]
    assert by_seed[0] != by_seed[1] and by_seed[0] != by_slot


def test_rewrites_differ_but_keep_colour_and_shape_words() -> None:
    for i, c in enumerate(CAPTIONS):
        for j in range(2):
            out = paraphrase(c, seed=0, key=f"train-{i}", slot=j)
            assert normalise(out) != normalise(c), (c, out)
            keep = _words(c) & (set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES}
                                | {s + "es" for s in SHAPES})
            assert keep <= _words(out), (c, out)


def test_the_three_operations() -> None:
    assert attribute("two small red circles on the left") == (
        "two circles that are small and red on the left")
    assert attribute("a blue square") == "a square that is blue"
    assert attribute("two red coloured squares") == "two squares that are red coloured"
    assert attribute("a big blue coloured circle shape") == (
        "a circle shape that is big and blue coloured")
    assert reorder("a green cross near the top") == "near the top, a green cross"
    assert reorder("a photo of a green cross") == "a green cross, in a photo"
    assert reorder("click here") == "click here"
    assert paraphrase("click here", seed=0, key="k", slot=0) == "here click"   # EDA swap
    assert paraphrase("", seed=0, key="k", slot=0) == ""


def _batch(texts: list[object], rejected: list[str]) -> dict[str, np.ndarray]:
    n = len(texts)
    return {schema.KEY: np.array([f"k{i}" for i in range(n)], dtype=object),
            schema.TEXT: np.array(texts, dtype=object),
            schema.ROW_ID: np.arange(n, dtype=np.int64),
            schema.REJECT_REASON: np.array(rejected, dtype=object)}


def test_batch_columns_and_word_token_counts() -> None:
    batch = paraphrase_batch(_batch([b"a red circle", "two blue squares"], ["", ""]), k=2,
                             seed=0)
    for j in range(2):
        outs, toks = batch[raw_column(j)], batch[tokens_column(j)]
        assert toks.dtype == np.int64 and list(toks) == [len(o.split()) for o in outs]


def test_prepare_backend_validate_in_plain_python() -> None:
    cfg = RewriteConfig(k=2, sampling=SamplingConfig(seed=1))
    texts = [b"a small red circle on the left", b"two big blue squares", b"", b"IMG_0042.jpg",
             b"a green cross near the top"]                        # as the readers give them
    batch = prepare_batch(_batch(texts, ["", "", "", "", "decode_error"]))
    assert list(batch[schema.TEXT]) == [t.decode() for t in texts[:4]] + [""]  # rejected: unsent
    batch = paraphrase_batch(batch, k=cfg.k, seed=cfg.sampling.seed)
    table = pa.table({c: pa.array(list(v)) for c, v in batch.items()})
    out = validate_batch(table, k=2, captions=False, vcfg=ValidateConfig(),
                         prompt_texts=LaClipPrompts(cfg).example_texts())
    assert out.column(schema.TEXT).to_pylist() == texts                # restored, as bytes
    assert not [c for c in out.column_names if c.startswith("_")]
    aug = out.column(schema.TEXTS_AUG).to_pylist()
    why = out.column(schema.REWRITE_FALLBACKS).to_pylist()
    originals = [t.decode() for t in texts]
    assert [a[0] for a in aug] == originals and all(len(a) == 3 for a in aug)
    assert why[0] == why[1] == ["", ""] and aug[0][1] != originals[0]
    assert why[2] == ["empty_input"] * 2 and aug[2] == ["", "", ""]
    assert why[3] == ["echo"] * 2 or why[3] == ["empty"] * 2           # one word, unchanged
    assert why[4] == ["skipped_rejected"] * 2 and aug[4] == [originals[4]] * 3
    tokens = out.column(REWRITE_TOKENS).to_pylist()
    assert tokens[0] == len(aug[0][1].split()) + len(aug[0][2].split()) and tokens[4] == 0


def test_synthetic_captions_are_validated_with_the_rewrites() -> None:
    batch = prepare_batch(_batch([b"IMG_0042.jpg", b"a red circle", b"two squares"],
                                 ["", "", "near_duplicate"]))
    batch[RAW_CAPTION] = np.array(["a small red circle on the left", "I cannot see it", ""],
                                  dtype=object)
    batch[CAPTION_TOKENS] = np.array([8, 4, 0], dtype=np.int64)
    table = pa.table({c: pa.array(list(v)) for c, v in batch.items()})
    out = validate_batch(table, k=0, captions=True, vcfg=ValidateConfig(), prompt_texts=set())
    assert out.column(schema.SYNTHETIC_CAPTION).to_pylist() == [
        "a small red circle on the left", "a red circle", "two squares"]
    assert out.column(schema.CAPTION_FALLBACK).to_pylist() == ["", "refusal",
                                                               "skipped_rejected"]
    assert out.column(CAPTION_TOKENS_OUT).to_pylist() == [8, 4, 0]
    assert out.column(schema.TEXTS_AUG).to_pylist() == [["IMG_0042.jpg"], ["a red circle"],
                                                         ["two squares"]]     # k = 0
    assert out.column(schema.REWRITE_FALLBACKS).to_pylist() == [[], [], []]
    assert RAW_CAPTION not in out.column_names and CAPTION_TOKENS not in out.column_names
