"""Caption metrics on token ids: BLEU-4 (identical = 1, hand-computed cases, brevity, clipping,
corpus pooling), unigram F1, ids -> words (inverse_vocab round trip), and the objectives'
evaluate / caption_examples on a tiny real model and held-out rows.

    pytest tests/eval/test_captioning.py -q
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from vlmray.config import Config, DataConfig
from vlmray.config.data import SyntheticConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.synthetic import make_sample
from vlmray.data.tokenize import HashTokenizer
from vlmray.eval.captioning import (
    bleu4,
    caption_examples,
    caption_metrics,
    content,
    inverse_vocab,
    unigram_f1,
    words_of,
)
from vlmray.eval.heldout import HeldOut
from vlmray.objectives import ObjectiveMix
from vlmray.train.state import build_core_model, setup_context
from vlmray.validate import validate


def test_bleu4_identical_is_one_and_hand_cases() -> None:
    assert bleu4([[4, 5, 6, 7, 8]], [[4, 5, 6, 7, 8]]) == pytest.approx(1.0)
    # one substitution at the end: p = 5/6, (4+1)/(5+1), (3+1)/(4+1), (2+1)/(3+1), BP = 1
    got = bleu4([[1, 2, 3, 4, 5, 6]], [[1, 2, 3, 4, 5, 7]])
    assert got == pytest.approx((5 / 6 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # a correct but short hypothesis: all p_n = 1, BP = exp(1 - 6/3)
    assert bleu4([[1, 2, 3]], [[1, 2, 3, 4, 5, 6]]) == pytest.approx(math.exp(-1.0))
    # clipping: "5 5 5 5" against "5 6" matches one 5 only
    assert bleu4([[5, 5, 5, 5]], [[5, 6]]) == pytest.approx((1 / 4 * 1 / 4 * 1 / 3 * 1 / 2)
                                                            ** 0.25)
    # corpus-level: counts pooled over pairs (p1 = 2/3), not sentence scores averaged
    assert bleu4([[1, 2], [3]], [[1, 2], [4]]) == pytest.approx((2 / 3) ** 0.25)
    assert bleu4([[9, 9]], [[1, 2]]) == 0.0 and bleu4([[]], [[1, 2]]) == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        bleu4([[1]], [])


def test_unigram_f1_and_content() -> None:
    assert unigram_f1([[1, 2, 2, 3]], [[2, 2, 4]]) == pytest.approx(4 / 7)
    assert unigram_f1([[5, 6]], [[6, 5]]) == 1.0
    assert unigram_f1([[], [7]], [[], [8]]) == pytest.approx(0.5)     # mean of 1 and 0
    assert content([1, 9, 8, 2, 7, 0], eos_id=2, special_ids=(0, 1, 2, 3)) == [9, 8]
    assert content(torch.tensor([1, 9, 3, 8]), eos_id=2, special_ids=(0, 1, 2, 3)) == [9, 8]


def _texts(n: int) -> list[str]:
    syn = SyntheticConfig()
    return [make_sample(syn, "eval", i)[schema.TEXT] for i in range(n)]


def test_inverse_vocab_round_trip() -> None:
    tok = HashTokenizer(vocab_size=8192, context_length=32)
    texts = _texts(40)
    vocab = inverse_vocab(tok, texts)
    assert len(vocab) > 20 and not set(vocab) & set(tok.special_ids)
    ids, _ = tok(texts)
    for text, row in zip(texts, ids):
        want = " ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
        assert words_of(torch.from_numpy(row), vocab) == want
    # the most frequent word wins an id two words share
    collide = HashTokenizer(vocab_size=5, context_length=8)                   # one word id: 4
    assert inverse_vocab(collide, ["red dot", "red red"]) == {4: "red"}
    assert words_of([1, 4, 77, 2], {4: "red"}) == "red <77>"


def _heldout(cfg: Config, n: int) -> HeldOut:
    syn = SyntheticConfig(num_eval=n, image_size=48)
    samples = [make_sample(syn, "eval", i) for i in range(n)]
    rows = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                        [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                        decode_spec(cfg.data), tokenizer_for(cfg.data))
    return HeldOut(pixels=torch.from_numpy(rows[schema.PIXELS]),
                   tokens=torch.from_numpy(rows[schema.TOKENS]),
                   token_mask=torch.from_numpy(rows[schema.TOKEN_MASK]),
                   labels=torch.from_numpy(rows[schema.LABEL]), classnames=[], templates=[],
                   keys=[str(k) for k in rows[schema.KEY]],
                   texts=[str(t) for t in rows[schema.TEXT]])


class Oracle(nn.Module):
    """Captions every image with its own reference: metrics must be perfect."""

    def __init__(self, data: HeldOut) -> None:
        super().__init__()
        self.data = data

    def generate(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int,
                 bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        rows = [next(i for i in range(len(self.data)) if torch.equal(self.data.pixels[i], p))
                for p in pixels]
        return self.data.tokens[rows, :max_len]


def test_objectives_evaluate_and_examples_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    cfg = validate(Config(data=DataConfig(context_length=12, vocab_size=512),
                          objectives=[ObjectiveSpec(name="clip"),
                                      ObjectiveSpec(name="caption", params={"n_queries": 4}),
                                      ObjectiveSpec(name="pali", params={"beam_size": 2})]))
    core = build_core_model(cfg).eval()
    mix = ObjectiveMix.from_specs(cfg.objectives).setup(setup_context(cfg, core))
    data, tok = _heldout(cfg, 6), tokenizer_for(cfg.data)
    metrics = mix.evaluate(core, data, tok)
    names = {f"{p}_{m}_{d}" for p in ("caption", "pali") for m in ("bleu4", "f1")
             for d in ("greedy", "beam")}
    assert set(metrics) == names and all(0.0 <= v <= 1.0 for v in metrics.values())
    perfect = caption_metrics(Oracle(data), core, data, tok, prefix="x", samples=4, beam_size=2)
    assert perfect == {k: pytest.approx(1.0) for k in
                       ("x_bleu4_greedy", "x_bleu4_beam", "x_f1_greedy", "x_f1_beam")}
    core.train()
    examples = caption_examples(mix.objectives["caption"], core, data, tok, n=5)
    assert core.training and mix.objectives["caption"].training       # modes given back
    assert [e["key"] for e in examples] == data.keys[:5]
    for example, text in zip(examples, data.texts):
        assert set(example) == {"key", "reference", "greedy", "beam"}
        assert example["reference"].split()[:3] == re.findall(r"[a-z0-9]+|[^\sa-z0-9]",
                                                              text.lower())[:3]
        assert isinstance(example["greedy"], str) and isinstance(example["beam"], str)
