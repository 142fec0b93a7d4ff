"""Rewritten and synthetic captions on the training side (La-CLIP, ALIP): decode of
``texts_aug`` / ``synthetic_caption`` into token columns (from sidecars and from the rewrite
prefix's columns), La-CLIP's per-epoch uniform caption draw, fallback counts, config checks.

    pytest tests/data/test_texts_aug.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmray.config import ConfigError, DataConfig, apply_overrides
from vlmray.config.data import SyntheticConfig, ViewsConfig
from vlmray.config.rewrite import RewriteConfig
from vlmray.data import schema
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.ingest import DecodeStage, decode_spec, train_columns
from vlmray.data.stream import StreamTally, count_fallbacks
from vlmray.data.synthetic import make_sample
from vlmray.data.tokenize import HashTokenizer
from vlmray.data.views import ViewStage, sample_captions

TOK = HashTokenizer(vocab_size=512, context_length=12)
SYN = SyntheticConfig(num_train=8, num_eval=8, image_size=48, shard_size=8)
REWRITES = ["a crimson disc on grey", "one red round shape", "the circle is red", "red ring",
            "a ruby circle"]


def samples(n: int) -> list[dict]:
    return [make_sample(SYN, "eval", i) for i in range(n)]


def with_meta(sample: dict, **fields: object) -> str:
    """The sample's sidecar with extra keys (what jobs/rewrite_captions.py writes)."""
    return json.dumps({**json.loads(sample[schema.META]), **fields})


def sidecar_rows() -> tuple[list, list, list, list]:
    """Rows: 5 rewrites, 1 rewrite + an empty one, none, a rejected image, a synthetic caption
    only, and a blank synthetic caption."""
    s = samples(6)
    texts = [x[schema.TEXT] for x in s]
    metas = [with_meta(s[0], texts_aug=[texts[0], *REWRITES], synthetic_caption="a red circle"),
             with_meta(s[1], texts_aug=[texts[1], REWRITES[0], ""]),
             s[2][schema.META],
             with_meta(s[3], texts_aug=[texts[3], REWRITES[1]], synthetic_caption="x y"),
             with_meta(s[4], synthetic_caption="a blue square"),
             with_meta(s[5], synthetic_caption="  ")]
    images = [x[schema.IMAGE] for x in s]
    images[3] = None                                                     # rejected row
    return [x[schema.KEY] for x in s], images, texts, metas


def test_sidecar_texts_aug_slots_truncation_and_empty_slots() -> None:
    keys, images, texts, metas = sidecar_rows()
    spec = DecodeSpec(image_size=16, texts_aug=4)
    out = prepare_rows(keys, images, texts, metas, spec, TOK)
    ids, mask = out[schema.TOKENS_AUG], out[schema.TOKEN_MASK_AUG]
    assert ids.shape == mask.shape == (6, 4, 12) and ids.dtype == mask.dtype == np.int64
    assert out[schema.REJECT_REASON].tolist() == ["", "", "", "missing_image", "", ""]
    kept = [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(ids[kept, 0], out[schema.TOKENS][kept])     # slot 0 = TOKENS
    np.testing.assert_array_equal(mask[kept, 0], out[schema.TOKEN_MASK][kept])
    np.testing.assert_array_equal(ids[0, 1:], TOK(REWRITES[:3])[0])          # 5 -> first 3
    np.testing.assert_array_equal(ids[1, 1], TOK(REWRITES[:1])[0][0])
    live = mask.sum(-1) > 0                                                   # (B, T)
    assert live.tolist() == [[True] * 4, [True, True, False, False],
                             [True, False, False, False], [False] * 4,
                             [True, False, False, False], [True, False, False, False]]
    assert not ids[~live].any()                                               # empty = all-zero
    assert schema.SYNTHETIC_TOKENS not in out


def test_sidecar_synthetic_caption_falls_back_to_the_caption() -> None:
    keys, images, texts, metas = sidecar_rows()
    out = prepare_rows(keys, images, texts, metas,
                       DecodeSpec(image_size=16, synthetic_caption=True), TOK)
    ids, mask = out[schema.SYNTHETIC_TOKENS], out[schema.SYNTHETIC_TOKEN_MASK]
    assert ids.shape == mask.shape == (6, 12) and schema.TOKENS_AUG not in out
    expect = TOK(["a red circle", texts[1], texts[2], "", "a blue square", texts[5]])[0]
    for i in (0, 1, 2, 4, 5):                 # rows 1, 2 have none, row 5 a blank one
        np.testing.assert_array_equal(ids[i], expect[i])
    assert not ids[3].any() and not mask[3].any()                            # rejected


def test_prefix_columns_win_over_sidecars_and_fallbacks_pass_through() -> None:
    """Inside the ingest plan the rewrite prefix's columns are used (the sidecars here say
    something else), rewrites arrive as NumPy arrays, and the fallback columns survive."""
    keys, images, texts, metas = sidecar_rows()
    aug = np.empty(6, dtype=object)
    for i, t in enumerate(texts):
        aug[i] = np.asarray([t, f"rewrite {i} one", f"rewrite {i} two"], dtype=object)
    aug[2] = None                                                            # no rewrites
    batch = {schema.KEY: np.asarray(keys, dtype=object),
             schema.IMAGE: np.asarray(images, dtype=object),
             schema.TEXT: np.asarray(texts, dtype=object),
             schema.META: np.asarray(metas, dtype=object),
             schema.TEXTS_AUG: aug,
             schema.SYNTHETIC_CAPTION: np.asarray([f"synthetic {i}" for i in range(6)], object),
             schema.REWRITE_FALLBACKS: np.asarray([np.asarray(["", "too_long"])] * 6, object),
             schema.CAPTION_FALLBACK: np.asarray(["", "", "empty", "", "", ""], object)}
    cfg = DataConfig(extra_texts=["texts_aug", "synthetic_caption"], max_texts_aug=3,
                     vocab_size=512, context_length=12)
    out = DecodeStage(cfg)(batch)
    ids = out[schema.TOKENS_AUG]
    assert ids.shape == (6, 3, 12)
    np.testing.assert_array_equal(ids[0, 1:], TOK(["rewrite 0 one", "rewrite 0 two"])[0])
    assert not ids[2, 1:].any() and ids[2, 0].any()
    np.testing.assert_array_equal(out[schema.SYNTHETIC_TOKENS][4], TOK(["synthetic 4"])[0][0])
    assert out[schema.CAPTION_FALLBACK].tolist() == batch[schema.CAPTION_FALLBACK].tolist()
    counts = count_fallbacks(out)
    assert counts == {"rewrite_fallbacks": {"kept": 6, "too_long": 6},
                      "caption_fallbacks": {"kept": 5, "empty": 1}}


def test_train_columns_and_spec_only_when_configured() -> None:
    plain, both = DataConfig(), DataConfig(extra_texts=["synthetic_caption", "texts_aug"],
                                           max_texts_aug=2)
    aug = {schema.TOKENS_AUG, schema.TOKEN_MASK_AUG}
    syn = {schema.SYNTHETIC_TOKENS, schema.SYNTHETIC_TOKEN_MASK}
    assert not (aug | syn) & set(train_columns(plain))
    assert (aug | syn) <= set(train_columns(both))
    assert decode_spec(plain).texts_aug == 0 and not decode_spec(plain).synthetic_caption
    assert decode_spec(both).texts_aug == 2 and decode_spec(both).synthetic_caption


def aug_batch(live: list[list[bool]], length: int = 6) -> dict[str, np.ndarray]:
    """Rows whose slot s holds the token 10 + s (empty slots all zero); TOKENS = slot 0."""
    b, t = len(live), len(live[0])
    ids = np.zeros((b, t, length), np.int64)
    for i, row in enumerate(live):
        for s, on in enumerate(row):
            if on:
                ids[i, s, :3] = [1, 10 + s, 2]
    mask = (ids != 0).astype(np.int64)
    return {schema.TOKENS: ids[:, 0].copy(), schema.TOKEN_MASK: mask[:, 0].copy(),
            schema.TOKENS_AUG: ids, schema.TOKEN_MASK_AUG: mask,
            schema.LABEL: np.arange(b), schema.PIXELS: np.zeros((b, 3, 8, 8), np.uint8)}


LIVE = [[True, True, True, True], [True, False, True, False], [True, False, False, True],
        [True, False, False, False], [False, False, False, False]]


def test_uniform_draw_frequencies_are_one_over_n_and_empty_slots_never() -> None:
    """Over N draws per row, each of its n live slots is drawn ~N/n times: every count lies
    within 5 binomial standard deviations of N/n (a wrong rule, e.g. drawing over all T slots
    or always slot 0, misses by far more); empty slots are never drawn."""
    cfg = DataConfig(extra_texts=["texts_aug"], views=ViewsConfig(caption_sampling="uniform"))
    stage, batch, n_draws = ViewStage(cfg), aug_batch(LIVE), 2000
    counts = np.zeros((len(LIVE), 4), np.int64)
    for _ in range(n_draws):
        out = stage(batch)
        assert schema.TOKENS_AUG not in out and schema.TOKEN_MASK_AUG not in out
        drawn = out[schema.TOKENS][:, 1]
        for i, tok in enumerate(drawn[:4]):
            counts[i, tok - 10] += 1
        np.testing.assert_array_equal(out[schema.TOKEN_MASK], (out[schema.TOKENS] != 0))
        assert not out[schema.TOKENS][4].any()          # no live slot: its own (empty) caption
    for i, row in enumerate(LIVE[:4]):
        n = sum(row)
        p = 1 / n
        bound = 5 * np.sqrt(n_draws * p * (1 - p)) + 1
        for s, on in enumerate(row):
            if on:
                assert abs(counts[i, s] - n_draws * p) <= bound, (i, counts[i])
            else:
                assert counts[i, s] == 0, (i, counts[i])


def test_original_sampling_keeps_tokens_and_columns() -> None:
    cfg = DataConfig(extra_texts=["texts_aug"], views=ViewsConfig(image=["local"]))
    batch = aug_batch(LIVE)
    out = ViewStage(cfg)(batch)
    np.testing.assert_array_equal(out[schema.TOKENS], batch[schema.TOKENS])
    np.testing.assert_array_equal(out[schema.TOKENS_AUG], batch[schema.TOKENS_AUG])


def test_uniform_without_the_columns_keeps_captions_and_mlm_masks_the_drawn_one() -> None:
    cfg = DataConfig(extra_texts=["texts_aug"], vocab_size=64,
                     views=ViewsConfig(caption_sampling="uniform", mlm_prob=0.5))
    batch = aug_batch([[False, False, True, False]] * 8)     # only slot 2 live: always drawn
    out = ViewStage(cfg)(batch)
    assert (out[schema.TOKENS][:, 1] == 12).all()
    labels = out[schema.MLM_LABELS]
    assert (labels[labels != -100] == 12).all() and (labels == 12).any()
    plain = {k: v for k, v in batch.items() if k not in (schema.TOKENS_AUG,
                                                         schema.TOKEN_MASK_AUG)}
    np.testing.assert_array_equal(ViewStage(cfg)(plain)[schema.TOKENS], batch[schema.TOKENS])


def test_sample_captions_is_seeded_by_its_generator() -> None:
    b = aug_batch(LIVE * 20)
    args = (b[schema.TOKENS], b[schema.TOKEN_MASK], b[schema.TOKENS_AUG], b[schema.TOKEN_MASK_AUG])
    one = sample_captions(*args, np.random.default_rng(3))[0]
    np.testing.assert_array_equal(one, sample_captions(*args, np.random.default_rng(3))[0])
    assert not np.array_equal(one, sample_captions(*args, np.random.default_rng(4))[0])


def test_config_checks_and_automatic_extra_texts() -> None:
    assert DataConfig(rewrite=RewriteConfig(k=2)).extra_texts == ["texts_aug"]
    assert DataConfig(rewrite=RewriteConfig(captioner="oracle")).extra_texts == [
        "synthetic_caption"]
    assert DataConfig().extra_texts == [] and not DataConfig().views.enabled
    assert ViewsConfig(caption_sampling="uniform").enabled
    with pytest.raises(ValueError, match=r"add 'texts_aug' to data.extra_texts"):
        DataConfig(views=ViewsConfig(caption_sampling="uniform"))
    with pytest.raises(ValueError, match=r"not one of \['original', 'uniform'\]"):
        ViewsConfig(caption_sampling="random")
    with pytest.raises(ValueError, match=r"\[.texts_aug., .synthetic_caption.\]"):
        DataConfig(extra_texts=["texts_aug", "captions"])
    with pytest.raises(ValueError, match="at most once"):
        DataConfig(extra_texts=["texts_aug", "texts_aug"])
    with pytest.raises(ValueError, match="max_texts_aug"):
        DataConfig(max_texts_aug=0)
    with pytest.raises(ConfigError, match="add 'texts_aug'"):         # the command line's path
        apply_overrides(DataConfig(), {"views.caption_sampling": "uniform"})
    cfg = apply_overrides(DataConfig(), {"rewrite.k": "3", "views.caption_sampling": "uniform",
                                         "cache": "true"})    # rewrite + cache is allowed
    assert cfg.extra_texts == ["texts_aug"] and cfg.rewrite.k == 3 and cfg.cache


def test_stream_tally_counts_fallbacks_of_new_rows_once() -> None:
    tally = StreamTally()
    ids = np.arange(4, dtype=np.int64)
    reasons = np.asarray(["", "", "decode_error", ""], dtype=object)
    fallbacks = {schema.REWRITE_FALLBACKS: np.asarray(
        [np.asarray(["", "empty"]), np.asarray(["", ""]), np.asarray(["repetition", ""]),
         np.asarray(["", ""])], dtype=object)}
    tally.add(ids[:2], reasons[:2], {k: v[:2] for k, v in fallbacks.items()})
    tally.add(ids, reasons, fallbacks)                        # rows 0, 1 re-read: not recounted
    totals = tally.totals()
    assert totals["rewrite_fallbacks"] == {"kept": 6, "empty": 1, "repetition": 1}
    assert totals["rows_in"] == 4 and totals["reject_reasons"] == {"decode_error": 1}
