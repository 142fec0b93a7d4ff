"""The embedding stage on small batches: MiniLM text vectors, a vlmray checkpoint against its
own towers, early failures, decode errors, and the embedding parquet round trip.

    pytest tests/retrieval/test_embed.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config import Config
from vlmray.config.data import SyntheticConfig
from vlmray.config.retrieval import EmbedConfig
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.synthetic import make_sample
from vlmray.retrieval.embed import (
    EmbedStage,
    _embedding_table,
    _write_batch,
    read_embedding_table,
    read_embeddings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYN = SyntheticConfig(num_train=8, num_eval=2, image_size=48, shard_size=8)


def batch_of(texts: list, images: list | None = None) -> dict[str, np.ndarray]:
    n = len(texts)
    return {schema.KEY: np.array([f"k{i}" for i in range(n)], dtype=object),
            schema.ROW_ID: np.arange(n, dtype=np.int64),
            schema.TEXT: np.array(texts, dtype=object),
            schema.IMAGE: np.array(images if images is not None else [b""] * n, dtype=object)}


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [make_sample(SYN, "train", i) for i in range(6)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Config, torch.nn.Module]:
    run = tmp_path_factory.mktemp("run")
    return (run, *save_tiny_checkpoint(run))


def test_minilm_text_embeddings_are_unit_and_semantic() -> None:
    stage = EmbedStage(EmbedConfig(model="minilm", modality="text", batch_size=2))
    texts = ["a photo of a red circle", "a picture of a red circle", "tax law of the 1800s",
             b"a drawing of a blue square"]
    out = stage(batch_of(texts))
    emb = out[schema.TEXT_EMBED]
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.8 and sim[0, 1] > sim[0, 2] + 0.5
    assert list(out[schema.REJECT_REASON]) == [""] * 4       # text only: images not looked at
    assert out[schema.TEXT][3] == "a drawing of a blue square"  # bytes captions decoded
    assert schema.IMAGE_EMBED not in out


def test_minilm_cannot_embed_images() -> None:
    with pytest.raises(ValueError, match="text only"):
        EmbedConfig(model="minilm", modality="both")
    with pytest.raises(ValueError, match="valid choices"):
        EmbedConfig(model="minilm", modality="audio")  # type: ignore[arg-type]


def test_vlmray_checkpoint_matches_its_towers_and_rejects_bad_images(run_dir, samples) -> None:
    run, cfg, model = run_dir
    stage = EmbedStage(EmbedConfig(model=str(run), modality="both", batch_size=4))
    images = [s[schema.IMAGE] for s in samples] + [b"not an image"]
    texts = [s[schema.TEXT] for s in samples] + ["broken"]
    batch = batch_of(texts, images)
    batch[schema.REJECT_REASON] = np.array([""] * 6 + [""], dtype=object)
    out = stage(batch)
    assert list(out[schema.REJECT_REASON]) == [""] * 6 + ["decode_error"]
    assert out[schema.REJECT_STAGE][6] == "embed"
    img, txt = out[schema.IMAGE_EMBED], out[schema.TEXT_EMBED]
    assert img.shape[0] == txt.shape[0] == 7 and img.dtype == txt.dtype == np.float32
    assert not img[6].any() and not txt[6].any()            # rejected rows: zeros
    ref = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                       [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                       decode_spec(cfg.data), tokenizer_for(cfg.data))
    with torch.no_grad():
        want_img = model.encode_image(torch.from_numpy(ref[schema.PIXELS]))[0].numpy()
        want_txt = model.encode_text(torch.from_numpy(ref[schema.TOKENS]),
                                     torch.from_numpy(ref[schema.TOKEN_MASK]))[0].numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(img[:6], unit(want_img), atol=1e-4)
    np.testing.assert_allclose(txt[:6], unit(want_txt), atol=1e-4)


def test_bad_model_fails_at_construction(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="embed.model"):
        EmbedStage(EmbedConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="needs EmbedConfig.model"):
        EmbedStage(EmbedConfig())


def test_embedding_files_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((5, 8)).astype(np.float32)
    batch = batch_of(["a", "b", "c", "d", "e"])
    batch[schema.TEXT_EMBED] = vec
    batch[schema.REJECT_REASON] = np.array(["", "decode_error", "", "", ""], dtype=object)
    batch[schema.REJECT_STAGE] = np.array(["", "embed", "", "", ""], dtype=object)
    summary = _write_batch(batch, str(tmp_path))
    assert list(summary[schema.KEY]) == ["k1", ""] and list(summary["written"]) == [0, 4]
    keys, got = read_embeddings(str(tmp_path), schema.TEXT_EMBED)
    assert list(keys) == ["k0", "k2", "k3", "k4"]
    np.testing.assert_array_equal(got, vec[[0, 2, 3, 4]])
    table = read_embedding_table(str(tmp_path))
    assert table.schema.field(schema.TEXT_EMBED).type == pa.list_(pa.float32(), 8)
    assert table.column(schema.TEXT).to_pylist() == ["a", "c", "d", "e"]
    assert _embedding_table(batch, np.arange(2)).num_rows == 2
