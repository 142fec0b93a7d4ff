"""Coin-flip mixup stage (vlmray.data.mixup): token concatenation on known captions, the pixel
formula, prob 0 is the identity, prob 1 mixes every row, labels, config checks, and draws
fixed by (seed, epoch, row ids).

    pytest tests/data/test_mixup.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.config import DataConfig, MixupConfig
from vlmray.data import schema
from vlmray.data.mixup import MixupStage, concat_tokens, mix_rows, partners
from vlmray.data.tokenize import BOS, EOS, PAD, HashTokenizer


def make_batch(texts: list[str], length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    tokens, mask = HashTokenizer(vocab_size=512, context_length=length)(texts)
    rng = np.random.default_rng(seed)
    n = len(texts)
    return {schema.PIXELS: rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
            schema.TOKENS: tokens, schema.TOKEN_MASK: mask,
            schema.LABEL: np.arange(n, dtype=np.int64) % 3}


def words(tok: HashTokenizer, text: str) -> list[int]:
    return tok.encode(text)[1:-1]


def test_partners_reverse_the_batch() -> None:
    assert partners(5).tolist() == [4, 3, 2, 1, 0]


def test_concat_tokens_exact_on_known_captions() -> None:
    tok = HashTokenizer(vocab_size=512, context_length=12)
    b = make_batch(["a red circle", "two blue squares left"], length=12)
    t, m = concat_tokens(b[schema.TOKENS][0], b[schema.TOKEN_MASK][0],
                         b[schema.TOKENS][1], b[schema.TOKEN_MASK][1])
    want = [BOS, *words(tok, "a red circle"), *words(tok, "two blue squares left"), EOS]
    assert t.tolist() == want + [PAD] * (12 - len(want))
    assert m.tolist() == [1] * len(want) + [0] * (12 - len(want))


def test_concat_tokens_truncates_and_keeps_eos() -> None:
    tok = HashTokenizer(vocab_size=512, context_length=8)
    first, second = "one two three four", "five six seven eight"
    b = make_batch([first, second], length=8)
    t, m = concat_tokens(b[schema.TOKENS][0], b[schema.TOKEN_MASK][0],
                         b[schema.TOKENS][1], b[schema.TOKEN_MASK][1])
    body = [BOS, *words(tok, first), *words(tok, second)][:7]
    assert t.tolist() == body + [EOS]
    assert m.tolist() == [1] * 8


def test_pixel_mixing_formula_and_untouched_rows() -> None:
    b = make_batch(["a", "b c", "d e f", "g"])
    lam = np.array([0.75, 0.6, 0.625, 0.7])     # binary fractions: exact in float32 too
    mixed = np.array([True, False, True, False])
    out = mix_rows(b, mixed, lam)
    x = b[schema.PIXELS].astype(np.float64)
    for i, j in ((0, 3), (2, 1)):
        want = np.clip(np.rint(lam[i] * x[i] + (1 - lam[i]) * x[j]), 0, 255)
        np.testing.assert_array_equal(out[schema.PIXELS][i], want)
    for i in (1, 3):
        assert np.array_equal(out[schema.PIXELS][i], b[schema.PIXELS][i])
        assert np.array_equal(out[schema.TOKENS][i], b[schema.TOKENS][i])
    assert out[schema.PIXELS].dtype == np.uint8
    # the inputs are not changed in place
    assert not np.array_equal(out[schema.PIXELS][0], b[schema.PIXELS][0])


def test_mixed_rows_label_is_kept_only_when_partner_shares_it() -> None:
    b = make_batch(["a", "b", "c", "d"])
    b[schema.LABEL] = np.array([5, 1, 2, 5])
    out = mix_rows(b, np.ones(4, bool), np.full(4, 0.7))
    assert out[schema.LABEL].tolist() == [5, -1, -1, 5]


def test_prob_zero_is_identity() -> None:
    b = make_batch(["a red circle", "b", "c d", "e"])
    out = MixupStage(MixupConfig(prob=0.0), seed=3)(b)
    for k in b:
        assert np.array_equal(out[k], b[k])


def test_prob_one_mixes_every_row_of_an_even_batch() -> None:
    texts = [f"caption number {i}" for i in range(8)]
    b = make_batch(texts, length=16)
    b[schema.PIXELS] = np.stack([np.full((3, 8, 8), 30 * i, np.uint8) for i in range(8)])
    out = MixupStage(MixupConfig(prob=1.0, alpha=1.0), seed=1)(b)
    lengths = out[schema.TOKEN_MASK].sum(1)
    assert (lengths == 3 + 3 + 2).all()           # BOS + 3 words + 3 words + EOS, every row
    # each row's pixels move towards its partner's constant value, weighting its own >= 0.5
    own = b[schema.PIXELS][:, 0, 0, 0].astype(float)
    other, got = own[::-1], out[schema.PIXELS][:, 0, 0, 0].astype(float)
    lam = (got - other) / (own - other)
    assert ((lam >= 0.5 - 0.02) & (lam <= 1.0 + 0.02)).all()   # pixels are rounded
    assert (lam < 0.999).any()


def test_stage_is_deterministic_given_a_seed_and_draws_per_row() -> None:
    b = make_batch([f"w{i}" for i in range(64)], length=8)
    one = MixupStage(MixupConfig(prob=0.5), seed=7)(b)
    two = MixupStage(MixupConfig(prob=0.5), seed=7)(b)
    assert all(np.array_equal(one[k], two[k]) for k in b)
    changed = (one[schema.TOKEN_MASK].sum(1) != b[schema.TOKEN_MASK].sum(1)).mean()
    assert 0.3 < changed < 0.7


def with_ids(batch: dict[str, np.ndarray], start: int = 0) -> dict[str, np.ndarray]:
    n = len(batch[schema.PIXELS])
    return {**batch, schema.ROW_ID: np.arange(start, start + n, dtype=np.int64) + (2 << 32)}


def test_epoch_and_row_ids_fix_the_mixing_in_any_instance() -> None:
    b = with_ids(make_batch([f"w{i}" for i in range(64)], length=8))
    cfg = MixupConfig(prob=0.5)
    one, two = MixupStage(cfg, epoch=4)(b), MixupStage(cfg, epoch=4)(b)
    assert set(one) == set(b) and all(np.array_equal(one[k], two[k]) for k in b)
    np.testing.assert_array_equal(one[schema.ROW_ID], b[schema.ROW_ID])   # passes through
    assert one[schema.ROW_ID].dtype == np.int64
    assert not np.array_equal(one[schema.PIXELS], b[schema.PIXELS])        # it did mix
    others = [MixupStage(cfg, epoch=5)(b),                                  # another epoch
              MixupStage(cfg, epoch=4)(with_ids(b, start=64)),             # other rows
              MixupStage(cfg, seed=1, epoch=4)(b)]                         # another seed
    for other in others:
        assert not np.array_equal(one[schema.PIXELS], other[schema.PIXELS])
    same = MixupStage(cfg, seed=0, epoch=4)(b)                              # seed None is 0
    assert all(np.array_equal(one[k], same[k]) for k in b)


def test_without_epoch_or_row_ids_the_old_behaviour_holds() -> None:
    b = make_batch([f"w{i}" for i in range(64)], length=8)
    cfg = MixupConfig(prob=0.5)
    seeded = MixupStage(cfg, seed=7)(b)
    for stage, batch in ((MixupStage(cfg, seed=7), with_ids(b)),
                         (MixupStage(cfg, seed=7, epoch=1), b)):
        out = stage(batch)
        assert all(np.array_equal(out[k], seeded[k]) for k in b)
    fresh = MixupStage(cfg, epoch=1)
    assert not np.array_equal(fresh(b)[schema.PIXELS], fresh(b)[schema.PIXELS])


def test_mixup_config_checks() -> None:
    with pytest.raises(ValueError, match="prob"):
        MixupConfig(prob=1.5)
    with pytest.raises(ValueError, match="alpha"):
        MixupConfig(alpha=0.0)
    assert DataConfig().mixup.prob == 0.0         # off by default
