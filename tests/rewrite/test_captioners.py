"""Captioners: the built-in data's oracle (true-scene descriptions from the sidecar, even for
mismatched captions; deterministic; "" without sidecar fields), the transformers image-to-text
captioner on a tiny random-init VisionEncoderDecoderModel built offline in the test (checks,
plain-Python ``caption``, greedy and seeded sampling), and both as Ray Data stages (every row
and column kept).

    pytest tests/rewrite/test_captioners.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmray.config.data import SyntheticConfig
from vlmray.config.rewrite import RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.data.synthetic import make_sample
from vlmray.data.synthetic_text import COLOURS, SHAPES
from vlmray.rewrite.base import CAPTION_TOKENS, RAW_CAPTION, captioner
from vlmray.rewrite.captioners import (
    HFCaptioner,
    OracleCaptioner,
    TransformersCaptioner,
    check_captioner_model,
    oracle_batch,
    oracle_caption,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "red", "circle", "two", "blue", "squares"]
RED = WORDS.index("red")


def _samples(n: int = 12) -> list[dict]:
    syn = SyntheticConfig(num_train=64, num_eval=8, image_size=32)
    return [make_sample(syn, "train", i, "mismatch" if i % 3 == 1 else "") for i in range(n)]


# --- oracle -------------------------------------------------------------------------------------


def test_oracle_describes_the_true_scene() -> None:
    samples = _samples()
    for s in samples:
        meta = json.loads(s[schema.META])
        text = oracle_caption(s[schema.META], s[schema.KEY])
        colour, shape = meta["classname"].split()
        words = text.split()
        assert colour in words and any(w.startswith(shape) for w in words), (text, meta)
        assert not any(w in COLOURS and w != colour for w in words), text
        assert not any(w.startswith(h) for w in words for h in SHAPES if h != shape), text
        assert text == oracle_caption(meta, s[schema.KEY])                # deterministic
        if meta["noise"] == "mismatch":                   # the web caption names another class
            assert f"{colour} {shape}" not in s[schema.TEXT].lower()
    wordings = {oracle_caption(s[schema.META], s[schema.KEY]).split()[0] for s in samples}
    assert len(wordings) > 1                               # its own, varied wording
    seeded = {oracle_caption(samples[0][schema.META], samples[0][schema.KEY], seed)
              for seed in range(8)}
    assert len(seeded) > 1


def test_oracle_without_sidecar_fields_is_empty() -> None:
    assert oracle_caption("{}", "k") == ""
    assert oracle_caption("not json", "k") == ""
    assert oracle_caption(json.dumps({"classname": "red circle"}), "k") == ""
    batch = {schema.KEY: np.array(["a", "b"], dtype=object),
             schema.META: np.array([_samples(1)[0][schema.META], "{}"], dtype=object),
             "other": np.array([7, 8])}
    out = oracle_batch(batch)
    assert out[RAW_CAPTION][1] == "" and out[CAPTION_TOKENS][1] == 0
    assert out[CAPTION_TOKENS][0] == len(out[RAW_CAPTION][0].split()) > 3
    assert out["other"].tolist() == [7, 8]


# --- transformers: a tiny random-init image-to-text model built offline ------------------------


def _build_tiny_captioner(path: Path) -> None:
    """ViT (32 px) + GPT-2 decoder over a word-level tokenizer; the decoder's final norm and
    head are set so that greedy decoding always picks "red" (a known output to check)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                        bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32)
    dec = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(cfg)
    with torch.no_grad():
        ln_f = model.decoder.transformer.ln_f
        v = torch.linspace(-1.0, 1.0, 16)
        ln_f.weight.zero_()
        ln_f.bias.copy_(v)                                          # every state == v
        head = model.decoder.lm_head.weight
        head.copy_(0.1 * torch.randn(head.shape))
        head[RED] = 5.0 * v                                         # "red" wins greedily
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("captioner") / "tiny"
    _build_tiny_captioner(path)
    return str(path)


def _cfg(model: str, **sampling: float) -> RewriteConfig:
    return RewriteConfig(captioner="transformers", captioner_model=model, batch_size=4,
                         sampling=SamplingConfig(max_tokens=4, **sampling))


def test_check_fails_clearly_before_work(tmp_path: Path) -> None:
    from transformers import BertConfig

    with pytest.raises(FileNotFoundError, match="not a directory with config.json"):
        check_captioner_model(str(tmp_path / "missing"))
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not an image-to-text"):
        TransformersCaptioner(_cfg(str(tmp_path / "bert"))).check()
    with pytest.raises(ValueError, match="captioner_model"):
        RewriteConfig(captioner="transformers")


def test_hf_captioner_greedy_sampled_and_corrupt(tiny_model: str) -> None:
    images = [s[schema.IMAGE] for s in _samples(3)] + [b"not an image"]
    greedy = HFCaptioner(_cfg(tiny_model, temperature=0.0))
    assert greedy.caption(images) == [("red red red red", 4)] * 3 + [("", 0)]
    sampled = HFCaptioner(_cfg(tiny_model, temperature=1.5, top_p=1.0, seed=3))
    first, again = sampled.caption(images), sampled.caption(images)
    assert first == again and first[-1] == ("", 0)                  # seeded: reproducible
    for text, n in first[:3]:
        assert n == len(text.split()) <= 4 and set(text.split()) <= set(WORDS[4:])


def test_captioners_as_ray_data_stages(ray_local: None, tiny_model: str) -> None:
    import ray.data

    samples = _samples(6)
    rows = [{**s, "extra": i} for i, s in enumerate(samples)]
    ds = ray.data.from_items(rows)

    cfg = _cfg(tiny_model, temperature=0.0)
    assert isinstance(captioner(cfg), TransformersCaptioner)
    got = sorted(captioner(cfg).apply(ds).take_all(), key=lambda r: r["extra"])
    assert [r["extra"] for r in got] == list(range(6))
    assert all(r[RAW_CAPTION] == "red red red red" and r[CAPTION_TOKENS] == 4 for r in got)
    assert [r[schema.TEXT] for r in got] == [s[schema.TEXT] for s in samples]

    oracle = captioner(RewriteConfig(captioner="oracle"))
    assert isinstance(oracle, OracleCaptioner)
    got = sorted(oracle.apply(ds).take_all(), key=lambda r: r["extra"])
    assert [r[RAW_CAPTION] for r in got] == [oracle_caption(s[schema.META], s[schema.KEY])
                                            for s in samples]
    assert [r[schema.IMAGE] for r in got] == [s[schema.IMAGE] for s in samples]
