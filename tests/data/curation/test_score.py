"""Image-text agreement scores: a vlmray checkpoint and a local transformers CLIP, each checked
against a direct computation with the model; thresholds; keep-top-fraction.

    pytest tests/data/curation/test_score.py -q
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config import Config
from vlmray.config.curation import ScoreConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.curation.hashing import normalise_caption
from vlmray.data.curation.score import BELOW_TOP_FRACTION, LOW_CLIP_SCORE, ScoreStage, TopFraction
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.storage import filesystem
from vlmray.data.synthetic import make_sample
from vlmray.embedders import CLIP_MEAN, CLIP_STD, resolve_model
from vlmray.train.checkpoint import Progress, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYN = SyntheticConfig(num_train=12, num_eval=4, image_size=48, shard_size=12)
N = 8


def scored(cfg: ScoreConfig) -> ScoreStage:
    """The stage as the composing code builds it: the model resolved first, then handed in."""
    return ScoreStage(cfg, resolve_model(cfg.model))


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [make_sample(SYN, "train", i) for i in range(N)]


def rows(samples: list[dict], rejected: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """A batch as the curation stages see it: live rows, or some already rejected."""
    rejected = rejected or {}

    def col(key: str) -> np.ndarray:
        return np.array([s[key] for s in samples], dtype=object)

    return {schema.ROW_ID: np.arange(len(samples), dtype=np.int64), schema.KEY: col(schema.KEY),
            schema.IMAGE: col(schema.IMAGE), schema.TEXT: col(schema.TEXT),
            schema.REJECT_REASON: np.array([rejected.get(i, "") for i in range(len(samples))],
                                           dtype=object),
            schema.REJECT_STAGE: np.array(["text" if i in rejected else ""
                                           for i in range(len(samples))], dtype=object)}


# --- a vlmray checkpoint -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Config, torch.nn.Module]:
    run = tmp_path_factory.mktemp("run")
    return (run, *save_tiny_checkpoint(run, step=3))


def direct_vlmray(cfg: Config, model: torch.nn.Module, samples: list[dict]) -> np.ndarray:
    """The score as training would see the pair: prepare_rows, then the two towers."""
    batch = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                         [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                         decode_spec(cfg.data), tokenizer_for(cfg.data))
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(batch[schema.PIXELS]))[0]
        txt = model.encode_text(torch.from_numpy(batch[schema.TOKENS]),
                                torch.from_numpy(batch[schema.TOKEN_MASK]))[0]
    return (img * txt).sum(1).double().numpy()


def test_vlmray_checkpoint_scores_match_the_model(run_dir, samples) -> None:
    run, cfg, model = run_dir
    stage = scored(ScoreConfig(model=str(run), batch_size=3))   # the run dir: latest used
    stage = pickle.loads(pickle.dumps(stage))                        # ships light, loads later
    assert stage._embedder is None and stage.resources.actors == 1
    out = stage(rows(samples))
    scores = out[schema.CLIP_SCORE]
    assert scores.dtype == np.float64 and np.all(np.abs(scores) <= 1.0)
    np.testing.assert_allclose(scores, direct_vlmray(cfg, model, samples), atol=1e-5)
    assert (out[schema.REJECT_REASON] == "").all()                   # min_score off


def test_rejected_rows_pass_untouched_and_threshold_rejects(run_dir, samples) -> None:
    run, cfg, model = run_dir
    expected = direct_vlmray(cfg, model, samples)
    cut = float(np.median(expected))
    stage = scored(ScoreConfig(model=str(run / "ray" / "checkpoint_000003"), min_score=cut))
    batch = rows(samples, rejected={1: "empty_text", 4: "decode_error"})
    out = stage(batch)
    for i in (1, 4):
        assert np.isnan(out[schema.CLIP_SCORE][i])
        assert out[schema.REJECT_REASON][i] == batch[schema.REJECT_REASON][i]
        assert out[schema.REJECT_STAGE][i] == "text"
        assert out[schema.IMAGE][i] == samples[i][schema.IMAGE]
    live = np.array([i not in (1, 4) for i in range(N)])
    np.testing.assert_allclose(out[schema.CLIP_SCORE][live], expected[live], atol=1e-5)
    low = live & (expected < cut - 1e-6)
    assert low.any() and (out[schema.REJECT_REASON][low] == LOW_CLIP_SCORE).all()
    assert (out[schema.REJECT_STAGE][low] == "score").all()
    assert (out[schema.IMAGE][low] == b"").all()
    assert (out[schema.REJECT_REASON][live & (expected > cut + 1e-6)] == "").all()


def test_checkpoint_on_s3(run_dir, samples, s3_bucket) -> None:
    run, cfg, model = run_dir
    fs, root = filesystem(f"{s3_bucket}/runs/a")
    fs.put(str(run), root, recursive=True)
    stage = scored(ScoreConfig(model=f"{s3_bucket}/runs/a"))
    assert stage.source.path.startswith("s3://") and stage.source.path.endswith("000003")
    out = stage(rows(samples))
    np.testing.assert_allclose(out[schema.CLIP_SCORE], direct_vlmray(cfg, model, samples),
                               atol=1e-5)


def test_missing_or_invalid_model_fails_when_resolved(tmp_path, run_dir) -> None:
    with pytest.raises(FileNotFoundError, match="no vlmray checkpoint"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no vlmray checkpoint"):
        resolve_model(str(tmp_path / "empty"))
    torn = tmp_path / "torn"                  # state.pt is not what torch.save writes
    torn.mkdir()
    for name in ("state.pt", "progress.json"):
        (torn / name).write_text(json.dumps({"step": 1}))
    (torn / "config.json").write_text(json.dumps(Config().to_dict()))
    with pytest.raises(FileNotFoundError, match="no vlmray checkpoint"):
        resolve_model(str(torn))
    model = torch.nn.Linear(2, 2)                       # intact, but not a vlmray config
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = save_checkpoint(tmp_path / "bad", model=model, optimizer=opt,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                          progress=Progress(step=1), config={"not_a_field": 1})
    with pytest.raises(ValueError, match="not a vlmray config"):
        resolve_model(str(bad))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        resolve_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="scoring is off"):
        ScoreStage(ScoreConfig(), resolve_model(str(run_dir[0])))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="need a scoring model"):
        ScoreConfig(min_score=0.2)
    with pytest.raises(ValueError, match="keep_top_fraction"):
        ScoreConfig(model="x", keep_top_fraction=0.0)
    with pytest.raises(ValueError, match="min_score"):
        ScoreConfig(model="x", min_score=1.5)
    with pytest.raises(ValueError, match="device"):
        ScoreConfig(model="x", num_gpus=1, device="cpu")
    assert not ScoreConfig().enabled and ScoreConfig(model="x").enabled


# --- a local transformers CLIP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, samples) -> Path:
    """A random-init CLIP with a word-level tokenizer over the sample captions, saved offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for s in samples for w in normalise_caption(s[schema.TEXT]).split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3,
             **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
    cfg = CLIPConfig(text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 24,
                                  "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
                     vision_config={**small, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            bos_token="[BOS]", eos_token="[EOS]").save_pretrained(path)
    return path


def direct_clip(path: Path, samples: list[dict]) -> np.ndarray:
    """CLIP's public feature API on a plain PIL resize/crop/normalise of each image."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    side = model.config.vision_config.image_size
    pixels = []
    for s in samples:
        im = Image.open(io.BytesIO(s[schema.IMAGE])).convert("RGB")
        scale = side / min(im.size)
        w, h = max(side, round(im.size[0] * scale)), max(side, round(im.size[1] * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - side) // 2, (h - side) // 2
        x = np.asarray(im.crop((left, top, left + side, top + side)), np.float32) / 255.0
        pixels.append(((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    enc = tok([s[schema.TEXT] for s in samples], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(np.stack(pixels)).float())
        txt = model.get_text_features(input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"])
    img, txt = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (img, txt))
    img, txt = (torch.nn.functional.normalize(t.double(), dim=-1) for t in (img, txt))
    return (img * txt).sum(1).numpy()


def test_hf_clip_scores_match_the_model(hf_dir, samples) -> None:
    assert not (hf_dir / "preprocessor_config.json").exists()
    stage = scored(ScoreConfig(model=f"hf:{hf_dir}", batch_size=5, device="cpu"))
    out = stage(rows(samples, rejected={2: "empty_text"}))
    scores = out[schema.CLIP_SCORE]
    assert np.isnan(scores[2]) and np.all(np.abs(np.delete(scores, 2)) <= 1.0)
    expected = direct_clip(hf_dir, samples)
    np.testing.assert_allclose(np.delete(scores, 2), np.delete(expected, 2), atol=1e-5)


def test_hf_dir_that_is_not_a_clip_fails_when_resolved(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="only 'clip'"):
        resolve_model(f"hf:{tmp_path}")


# --- keep the top fraction ---------------------------------------------------------------------


def test_top_fraction_with_ties_and_nans() -> None:
    ids = np.array([10, 3, 7, 1, 5, 8, 2, 9, 4, 6], dtype=np.int64)
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.5, 0.1, np.nan, 0.9, 0.5, -0.2])
    table = {schema.ROW_ID: ids, schema.KEY: ids.astype(str).astype(object),
             schema.CLIP_SCORE: scores}
    # ranked: 0.9 (3, 9), 0.5 (4, 5, 7, 10), 0.1 (8), -0.2 (6), NaN (1, 2)
    ranked = [3, 9, 4, 5, 7, 10, 8, 6, 1, 2]
    for fraction, keep in ((0.3, 3), (0.5, 5), (0.25, 3), (0.95, 10), (0.05, 1)):
        d = TopFraction(ScoreConfig(model="x", keep_top_fraction=fraction)).decide(table)
        assert sorted(d.row_ids.tolist()) == sorted(ranked[keep:]), fraction
        assert set(d.reasons.tolist()) <= {BELOW_TOP_FRACTION}
    shuffled = {k: v[::-1] for k, v in table.items()}
    a = TopFraction(ScoreConfig(model="x", keep_top_fraction=0.3)).decide(table)
    b = TopFraction(ScoreConfig(model="x", keep_top_fraction=0.3)).decide(shuffled)
    assert a.row_ids.tolist() == b.row_ids.tolist()
    assert not TopFraction(ScoreConfig()).enabled()
    assert TopFraction(ScoreConfig(model="x", keep_top_fraction=0.3)).enabled()
