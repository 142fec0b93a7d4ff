"""The augmented-views stage (``vlmray.data.views.ViewStage``) and its operations.

Shapes and dtypes of every view kind, crop statistics on images of known content, flips, BERT
masking statistics, the derived texts, config checks, one run on a real local Ray, and views
fixed by (views.seed, epoch, row ids) in any instance and process.

    pytest tests/data/test_views.py -q
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from vlmray.config import ConfigError, DataConfig
from vlmray.config.data import SyntheticConfig, ViewsConfig
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.synthetic import make_sample, write_synthetic
from vlmray.data.tokenize import BOS, EOS, MASK, PAD, HashTokenizer
from vlmray.data.view_ops import (
    IGNORE_INDEX,
    attributes,
    eda,
    mlm_mask,
    random_flips,
    sample_crop_boxes,
    summary,
)
from vlmray.data.views import ViewStage
from vlmray.recipes import recipe
from vlmray.validate import validate

ALL = {"image": ["global", "local", "global"], "text": ["eda", "summary", "attributes"],
       "mlm_prob": 0.15, "render_text": True}


def rows(cfg: DataConfig, n: int = 8) -> dict[str, np.ndarray]:
    """A numpy batch as ingest makes it (synthetic JPEGs -> ``prepare_rows``), with TEXT."""
    syn = SyntheticConfig(num_train=n, num_eval=n, image_size=48, shard_size=n)
    samples = [make_sample(syn, "eval", i) for i in range(n)]
    out = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                       [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                       decode_spec(cfg), tokenizer_for(cfg))
    keep = (schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.LABEL, schema.TEXT)
    return {c: out[c] for c in keep}


def two_colour_batch(n: int, size: int = 32) -> dict[str, np.ndarray]:
    """Left half red, right half blue; tokens are irrelevant here."""
    pixels = np.zeros((n, 3, size, size), np.uint8)
    pixels[:, 0, :, : size // 2] = 255
    pixels[:, 2, :, size // 2:] = 255
    ids = np.zeros((n, 8), np.int64)
    return {schema.PIXELS: pixels, schema.TOKENS: ids, schema.TOKEN_MASK: ids.copy(),
            schema.LABEL: np.zeros(n, np.int64)}


def test_every_kind_has_its_shape_and_dtype_and_text_is_dropped() -> None:
    cfg = DataConfig(views=ViewsConfig(**ALL))
    batch = rows(cfg)
    out = ViewStage(cfg)(batch)
    b, s, length = 8, cfg.image_size, cfg.context_length
    assert schema.TEXT not in out
    expect = {schema.PIXELS: ((b, 3, s, s), np.uint8), schema.TOKENS: ((b, length), np.int64),
              schema.TOKEN_MASK: ((b, length), np.int64), schema.LABEL: ((b,), np.int64),
              schema.PIXELS_VIEWS: ((b, 3, 3, s, s), np.uint8),
              schema.TOKENS_VIEWS: ((b, 3, length), np.int64),
              schema.TOKEN_MASK_VIEWS: ((b, 3, length), np.int64),
              schema.MLM_TOKENS: ((b, length), np.int64),
              schema.MLM_LABELS: ((b, length), np.int64),
              schema.TEXT_PIXELS: ((b, 3, s, s), np.uint8)}
    assert set(out) == set(expect)
    for name, (shape, dtype) in expect.items():
        assert out[name].shape == shape and out[name].dtype == dtype, name
    np.testing.assert_array_equal(out[schema.PIXELS], batch[schema.PIXELS])   # untouched
    tok = tokenizer_for(cfg)
    texts = list(batch[schema.TEXT])
    for slot, derive in ((1, summary), (2, attributes)):
        np.testing.assert_array_equal(out[schema.TOKENS_VIEWS][:, slot],
                                      tok([derive(t) for t in texts])[0])
    assert (out[schema.TEXT_PIXELS] < 128).any(axis=(1, 2, 3)).all()          # ink on each


def test_only_configured_columns_and_text_not_needed() -> None:
    cfg = DataConfig(views=ViewsConfig(image=["local"]))
    batch = rows(cfg, 4)
    del batch[schema.TEXT]
    out = ViewStage(cfg)(batch)
    assert set(out) == set(batch) | {schema.PIXELS_VIEWS}
    assert out[schema.PIXELS_VIEWS].shape == (4, 1, 3, cfg.image_size, cfg.image_size)
    needs = DataConfig(views=ViewsConfig(render_text=True))
    with pytest.raises(KeyError, match="caption column 'text'"):
        ViewStage(needs)(batch)


def test_empty_batch() -> None:
    cfg = DataConfig(views=ViewsConfig(**ALL))
    out = ViewStage(cfg)({k: v[:0] for k, v in rows(cfg, 2).items()})
    assert out[schema.PIXELS_VIEWS].shape == (0, 3, 3, cfg.image_size, cfg.image_size)
    assert out[schema.TOKENS_VIEWS].shape == (0, 3, cfg.context_length)
    assert out[schema.TEXT_PIXELS].shape[0] == out[schema.MLM_LABELS].shape[0] == 0


def test_global_crops_differ_between_calls() -> None:
    cfg = DataConfig(views=ViewsConfig(image=["global"]))
    stage, batch = ViewStage(cfg), rows(cfg)
    a, b = stage(batch)[schema.PIXELS_VIEWS], stage(batch)[schema.PIXELS_VIEWS]
    assert not np.array_equal(a, b)
    assert (a != b).any(axis=(1, 2, 3, 4)).mean() > 0.5                      # most rows


def _single_coloured(views: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) -> (B,) bool: >= 95% of pixels on one side of red-vs-blue."""
    red = (views[:, 0].astype(int) > views[:, 2].astype(int)).mean(axis=(1, 2))
    return (red >= 0.95) | (red <= 0.05)


def test_local_crops_come_from_a_small_region() -> None:
    cfg = DataConfig(views=ViewsConfig(image=["global", "local"]))
    views = ViewStage(cfg)(two_colour_batch(400))[schema.PIXELS_VIEWS]
    global_single = _single_coloured(views[:, 0]).mean()
    local_single = _single_coloured(views[:, 1]).mean()
    assert global_single < 0.05 and local_single > 0.15, (global_single, local_single)


def test_crop_boxes_follow_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    boxes = sample_crop_boxes(rng, 5000, 224, (0.05, 0.4))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 224).all() and (left + w <= 224).all()
    area = h * w / 224**2
    assert 0.04 < area.min() and area.max() < 0.42
    assert ((w / h > 0.7) & (w / h < 1.4)).all()
    assert len(np.unique(boxes, axis=0)) > 4000


def test_flip_happens_about_half_the_time() -> None:
    pixels = np.zeros((4000, 3, 4, 4), np.uint8)
    pixels[..., 0] = 255                                                      # left column lit
    out = random_flips(pixels, np.random.default_rng(1))
    flipped = out[:, 0, 0, 3] == 255
    assert abs(flipped.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(out[flipped], pixels[flipped][..., ::-1])
    np.testing.assert_array_equal(out[~flipped], pixels[~flipped])


def _mlm_inputs(n: int) -> tuple[np.ndarray, np.ndarray, HashTokenizer]:
    tok = HashTokenizer(vocab_size=512, context_length=32)
    rng = np.random.default_rng(2)
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 400, rng.integers(1, 40)))
             for _ in range(n)]
    ids, mask = tok(texts)
    return ids, mask, tok


def test_mlm_masks_prob_of_real_tokens_bert_style() -> None:
    ids, mask, tok = _mlm_inputs(3000)
    new, labels = mlm_mask(ids, mask, 0.15, np.random.default_rng(3), mask_id=tok.mask_id,
                           special_ids=tok.special_ids, vocab_size=tok.vocab_size)
    chosen = labels != IGNORE_INDEX
    maskable = (mask == 1) & (ids != BOS) & (ids != EOS) & (ids != PAD)
    assert not (chosen & ~maskable).any()                                     # specials never
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    assert chosen.any(1).all()                                                # >= 1 per row
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(new[~chosen], ids[~chosen])                 # rest untouched
    to_mask = (new[chosen] == MASK).mean()
    kept = (new[chosen] == ids[chosen]).mean()
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03, (to_mask, kept)
    swapped = new[chosen & (new != MASK) & (new != ids)]
    assert len(swapped) and (swapped >= 4).all() and (swapped < tok.vocab_size).all()
    assert new.dtype == labels.dtype == np.int64


def test_mlm_row_without_real_tokens_gets_no_mask() -> None:
    tok = HashTokenizer(vocab_size=64, context_length=6)
    ids, mask = tok(["", "one"])
    new, labels = mlm_mask(ids, mask, 0.01, np.random.default_rng(0), mask_id=MASK,
                           special_ids=tok.special_ids, vocab_size=64)
    assert (labels[0] == IGNORE_INDEX).all() and (new[0] == ids[0]).all()
    assert labels[1].tolist() == [IGNORE_INDEX, ids[1, 1]] + [IGNORE_INDEX] * 4


def test_stage_mlm_matches_token_mask() -> None:
    cfg = DataConfig(views=ViewsConfig(mlm_prob=0.3))
    batch = rows(cfg, 16)
    out = ViewStage(cfg)(batch)
    chosen = out[schema.MLM_LABELS] != IGNORE_INDEX
    assert chosen.any(1).all() and not (chosen & (batch[schema.TOKEN_MASK] == 0)).any()
    assert not np.isin(batch[schema.TOKENS][chosen], [PAD, BOS, EOS]).any()


@pytest.mark.parametrize("text, first, content", [
    ("two red squares in the middle, on a white background", "two red squares in the middle",
     "red squares middle white background"),
    ("A photo of 3 small blue circles with soft shadows.", "A photo of 3 small blue circles",
     "small blue circles soft shadows"),
    ("one big yellow cross; near the top: on a plain background",
     "one big yellow cross", "big yellow cross top plain background"),
    ("a very long caption of many words that goes on without any break at all",
     "a very long caption of many words that", "long caption words goes break"),  # many: quantity
    ("the one", "the one", "the one"),                                        # fallback
    (", with red", "red", "red"),
])
def test_summary_and_attributes(text: str, first: str, content: str) -> None:
    assert summary(text) == first
    assert attributes(text) == content


def test_eda_is_never_empty_and_reuses_caption_words() -> None:
    rng = np.random.default_rng(4)
    captions = ["red", "two red squares", "a photo of three large green circles on the left"]
    changed = 0
    for _ in range(300):
        for text in captions:
            for p in (0.1, 0.5, 0.99):
                out = eda(text, p, rng)
                assert out.split() and set(out.split()) <= set(text.split())
                changed += out != text
    assert changed > 300
    assert eda("", 0.5, rng) == ""


def test_bad_kind_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"'glob' is not one of \['global', 'local'\]"):
        ViewsConfig(image=["glob"])
    with pytest.raises(ValueError, match=r"'eda2' is not one of \['eda', 'summary', 'attri"):
        ViewsConfig(text=["eda2"])
    with pytest.raises(ConfigError, match=r"data.views.image: 'glob' is not one of"):
        recipe("clip_tiny", **{"data.views.image": '["glob"]'})
    with pytest.raises(ConfigError, match=r"data.views.text: 'x' is not one of"):
        validate(recipe("clip_tiny", **{"data.views.text": '["x"]'}))
    ok = validate(recipe("clip_tiny", **{"data.views.text": '["eda", "summary"]'}))
    assert ok.data.views.text == ["eda", "summary"] and ok.data.views.needs_text


def test_mlm_with_a_tokenizer_without_mask_fails_at_construction(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "red": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    cfg = DataConfig(tokenizer=f"hf:{tmp_path / 'tok'}", views=ViewsConfig(mlm_prob=0.15))
    with pytest.raises(ValueError, match="no mask token"):
        ViewStage(cfg)
    ViewStage(DataConfig(tokenizer=cfg.tokenizer, views=ViewsConfig(image=["global"])))


def test_ray_ingest_then_views(ray_local, tmp_path: Path) -> None:
    """Built-in shards -> run_ingest -> augment_train -> one torch batch with every column."""
    from vlmray.data.augment import augment_train
    from vlmray.pipelines.feed import run_ingest

    write_synthetic(SyntheticConfig(num_train=24, num_eval=4, shard_size=12), str(tmp_path))
    cfg = DataConfig(views=ViewsConfig(image=["global", "local"], text=["eda"], mlm_prob=0.15,
                                       render_text=True))
    train = augment_train(cfg, run_ingest(cfg, str(tmp_path / "train")).train)
    batch = next(iter(train.iter_torch_batches(batch_size=8)))
    import torch

    s, length = cfg.image_size, cfg.context_length
    expect = {schema.PIXELS_VIEWS: ((8, 2, 3, s, s), torch.uint8),
              schema.TOKENS_VIEWS: ((8, 1, length), torch.int64),
              schema.TOKEN_MASK_VIEWS: ((8, 1, length), torch.int64),
              schema.MLM_TOKENS: ((8, length), torch.int64),
              schema.MLM_LABELS: ((8, length), torch.int64),
              schema.TEXT_PIXELS: ((8, 3, s, s), torch.uint8),
              schema.PIXELS: ((8, 3, s, s), torch.uint8)}
    assert schema.TEXT not in batch
    for name, (shape, dtype) in expect.items():
        assert tuple(batch[name].shape) == shape and batch[name].dtype == dtype, name
    assert (batch[schema.MLM_LABELS] != IGNORE_INDEX).any(1).all()


# --- randomness keyed by (views.seed, epoch, row ids) -------------------------------------------


def with_ids(batch: dict[str, np.ndarray], start: int = 5 << 32) -> dict[str, np.ndarray]:
    """``batch`` with a ROW_ID column (file 5's rows start..)."""
    ids = np.arange(start, start + len(batch[schema.PIXELS]), dtype=np.int64)
    return {**batch, schema.ROW_ID: ids}


def _views_in_a_process(cfg: DataConfig, batch: dict[str, np.ndarray],
                        epoch: int) -> dict[str, np.ndarray]:
    return ViewStage(cfg, epoch=epoch)(batch)


def test_epoch_and_row_ids_fix_the_views_in_any_instance_and_process() -> None:
    cfg = DataConfig(views=ViewsConfig(**ALL, seed=11))
    batch = with_ids(rows(cfg))
    first = ViewStage(cfg, epoch=2)
    first(with_ids(rows(cfg), start=0))                      # calls before do not matter
    one = first(batch)
    two = ViewStage(cfg, epoch=2)(batch)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        three = pool.apply(_views_in_a_process, (cfg, batch, 2))
    assert set(one) == set(two) == set(three)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)
        np.testing.assert_array_equal(one[k], three[k], err_msg=k)
    np.testing.assert_array_equal(one[schema.ROW_ID], batch[schema.ROW_ID])  # passes through
    assert one[schema.ROW_ID].dtype == np.int64


def test_another_epoch_seed_or_rows_draw_other_views() -> None:
    cfg = DataConfig(views=ViewsConfig(image=["global"], mlm_prob=0.15))
    batch = with_ids(rows(cfg))
    base = ViewStage(cfg, epoch=0)(batch)
    others = [ViewStage(cfg, epoch=1)(batch),
              ViewStage(cfg, epoch=0)(with_ids(batch, start=6 << 32)),
              ViewStage(DataConfig(views=ViewsConfig(image=["global"], mlm_prob=0.15,
                                                     seed=1)), epoch=0)(batch)]
    for other in others:
        a, b = base[schema.PIXELS_VIEWS], other[schema.PIXELS_VIEWS]
        assert (a != b).any(axis=(1, 2, 3, 4)).mean() > 0.5                 # most rows
        assert not np.array_equal(base[schema.MLM_TOKENS], other[schema.MLM_TOKENS])


def test_without_epoch_or_row_ids_each_call_draws_afresh() -> None:
    cfg = DataConfig(views=ViewsConfig(image=["global"]))
    for stage, batch in ((ViewStage(cfg), with_ids(rows(cfg))),
                         (ViewStage(cfg, epoch=3), rows(cfg))):
        a, b = stage(batch)[schema.PIXELS_VIEWS], stage(batch)[schema.PIXELS_VIEWS]
        assert (a != b).any(axis=(1, 2, 3, 4)).mean() > 0.5
