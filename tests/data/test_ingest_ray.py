"""Ray Data ingest on a real local Ray: local and s3:// (moto's server) shards give the same rows,
every row is accounted for, and rejects carry their reasons."""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.config import DataConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.ingest import TRAIN_COLUMNS
from vlmray.data.synthetic import write_synthetic
from vlmray.pipelines.feed import run_ingest

SYN = SyntheticConfig(num_train=300, num_eval=20, shard_size=100, corrupt_frac=0.03,
                      overlong_frac=0.02)


# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ds"))
    write_synthetic(SYN, root)
    return root


def _sorted_tokens(ds) -> np.ndarray:
    batch = ds.take_batch(10_000, batch_format="numpy")
    order = np.lexsort(batch[schema.TOKENS].T[::-1])
    return batch[schema.TOKENS][order]


def test_local_ingest_accounts_for_every_row(ray_local, local_data, tmp_path) -> None:
    result = run_ingest(DataConfig(), f"{local_data}/train", rejects_uri=str(tmp_path / "rej"))
    assert result.rows_in == 300
    assert result.reject_reasons == {"decode_error": 9, "text_too_long": 6}
    assert result.rows_accepted + result.rows_rejected == result.rows_in
    assert sorted(result.train.columns()) == sorted(TRAIN_COLUMNS)
    batch = result.train.take_batch(8, batch_format="numpy")
    assert batch[schema.PIXELS].shape == (8, 3, 32, 32) and batch[schema.PIXELS].dtype == np.uint8
    assert (batch[schema.TOKEN_MASK].sum(1) > 2).all()
    assert ((batch[schema.LABEL] >= 0) & (batch[schema.LABEL] < 20)).all()


def test_s3_ingest_matches_local(s3_bucket, ray_local, local_data) -> None:
    write_synthetic(SYN, f"{s3_bucket}/ds")
    remote = run_ingest(DataConfig(), f"{s3_bucket}/ds/train", rejects_uri=f"{s3_bucket}/rejects")
    local = run_ingest(DataConfig(), f"{local_data}/train")
    assert remote.summary() == local.summary()
    np.testing.assert_array_equal(_sorted_tokens(remote.train), _sorted_tokens(local.train))
    import pyarrow.parquet as pq

    from vlmray.data.storage import arrow_filesystem

    fs, path = arrow_filesystem(f"{s3_bucket}/rejects")
    rejects = pq.read_table(path, filesystem=fs)
    assert rejects.num_rows == 15
