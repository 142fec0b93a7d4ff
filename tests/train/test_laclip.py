"""La-CLIP on a real local Ray: the rewrite stages as a streaming prefix of ingest (offline
backend, k = 2) -> decode of ``texts_aug`` into TOKENS_AUG -> every row accounted for, the
fallbacks counted in the summary -> the per-epoch uniform caption draw in Ray Data.

    pytest tests/train/test_laclip.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.config import DataConfig
from vlmray.config.data import SyntheticConfig, ViewsConfig
from vlmray.config.rewrite import RewriteConfig
from vlmray.data import schema
from vlmray.data.augment import augment_train
from vlmray.data.synthetic import write_synthetic
from vlmray.pipelines.feed import IngestResult, run_ingest

ROWS, K = 64, 2
SYN = SyntheticConfig(num_train=ROWS, num_eval=8, shard_size=32, corrupt_frac=0.05,
                      overlong_frac=0.05)
CFG = DataConfig(rewrite=RewriteConfig(backend="offline", k=K),
                 views=ViewsConfig(caption_sampling="uniform"))


@pytest.fixture(scope="module")
def ingest(ray_local, tmp_path_factory) -> IngestResult:
    root = tmp_path_factory.mktemp("laclip")
    write_synthetic(SYN, str(root))
    return run_ingest(CFG, str(root / "train"), rejects_uri=str(root / "rejects"))


def test_prefix_rows_carry_the_original_and_k_rewrites(ingest: IngestResult) -> None:
    assert CFG.extra_texts == ["texts_aug"]                      # added by data.rewrite.k > 0
    assert ingest.rows_in == ROWS
    assert ingest.rows_accepted + ingest.rows_rejected == ROWS
    assert ingest.reject_reasons == {"decode_error": 3, "text_too_long": 3}
    rows = ingest.train.take_all()
    assert len(rows) == ingest.rows_accepted
    ids = np.stack([r[schema.TOKENS_AUG] for r in rows])           # (N, T, L)
    mask = np.stack([r[schema.TOKEN_MASK_AUG] for r in rows])
    assert ids.shape == (len(rows), CFG.max_texts_aug, CFG.context_length)
    live = mask.sum(-1) > 0
    assert (live.sum(1) == 1 + K).all() and live[:, : 1 + K].all()  # slots 0..K, then empty
    assert not ids[:, 1 + K:].any()
    np.testing.assert_array_equal(ids[:, 0], np.stack([r[schema.TOKENS] for r in rows]))
    changed = (ids[:, 1:1 + K] != ids[:, :1]).any(-1)               # (N, K): a new wording
    assert changed.mean() > 0.5


def test_summary_counts_the_rewrite_fallbacks(ingest: IngestResult) -> None:
    summary = ingest.summary()
    fallbacks = summary["rewrite_fallbacks"]
    assert sum(fallbacks.values()) == ROWS * K                       # one outcome per slot
    assert fallbacks.get("kept", 0) >= ingest.rows_accepted * K // 2
    assert "caption_fallbacks" not in summary or sum(summary["caption_fallbacks"].values()) == 0
    assert summary["rows_in"] == ROWS


def test_uniform_draw_in_ray_data_reaches_rewrites(ingest: IngestResult) -> None:
    """One epoch through the views stage: TOKENS_AUG is gone, every caption is one of the
    rows' slots, and the share of drawn captions that are no row's original matches the
    uniform draw's expectation (mean over rows of (#slots not an original) / (K + 1)) within
    5 binomial standard deviations."""
    rows = ingest.train.take_all()
    originals = {tuple(r[schema.TOKENS]) for r in rows}
    live = [[tuple(s) for s, m in zip(r[schema.TOKENS_AUG], r[schema.TOKEN_MASK_AUG]) if m.any()]
            for r in rows]
    p = np.asarray([np.mean([s not in originals for s in row]) for row in live])   # (N,)
    batch = augment_train(CFG, ingest.train).take_batch(len(rows), batch_format="numpy")
    assert schema.TOKENS_AUG not in batch and schema.TOKEN_MASK_AUG not in batch
    drawn = [tuple(t) for t in batch[schema.TOKENS]]
    assert len(drawn) == len(rows) and set(drawn) <= {s for row in live for s in row}
    new = sum(d not in originals for d in drawn)
    assert p.sum() > 10                                      # rewrites that are new wordings
    assert abs(new - p.sum()) <= 5 * np.sqrt((p * (1 - p)).sum()) + 1, (new, p.sum())
