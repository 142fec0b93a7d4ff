"""Training reads curation: on a curation job's output (webdataset and parquet shards), and with
the same stages as a streaming prefix of ingest (``data.curate``), on one local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmray
from tests.train.test_pipeline_ray import SMALL
from vlmray.api import resolve_data
from vlmray.config.curation import WriteConfig
from vlmray.config.data import SyntheticConfig
from vlmray.config.jobs import CurateJobConfig
from vlmray.data import schema
from vlmray.pipelines.curate import run as curate
from vlmray.pipelines.feed import run_ingest

STEPS = {**SMALL, "train.steps": 4, "train.checkpoint_every": 0, "eval.every": 0}
SYN = SyntheticConfig(num_train=400, num_eval=60, shard_size=200, corrupt_frac=0.02,
                      overlong_frac=0.02, junk_frac=0.05, near_dup_frac=0.05)


@pytest.fixture(scope="module")
def curated(ray_local, tmp_path_factory) -> dict[str, tuple[str, dict]]:
    out = {}
    for fmt in ("webdataset", "parquet"):
        root = str(tmp_path_factory.mktemp(f"cur-{fmt}"))
        job = CurateJobConfig(input="builtin", output=root, synthetic=SYN,
                              write=WriteConfig(format=fmt, shard_size=128))
        out[fmt] = (root, curate(job).stats)
    return out


def test_pretrain_on_curated_output(curated, tmp_path) -> None:
    root, stats = curated["webdataset"]
    cfg = vlmray.recipe("clip_tiny", **{**STEPS, "data.source": root,
                                        "data.eval_source": f"{root}/raw/eval"})
    m = vlmray.run(cfg, output=str(tmp_path / "run")).metrics
    assert m["rows_in"] == stats["rows_out"]          # reads exactly the curated rows
    assert m["rows_rejected"] == 0                    # curation already removed the bad ones
    assert m["steps"] == 4 and m["zero_shot_top1"] is not None


def test_ingest_reads_curated_parquet(curated, tmp_path) -> None:
    """The parquet output feeds the same ingest (training on it is the same as above)."""
    root, stats = curated["parquet"]
    cfg = vlmray.recipe("clip_tiny", **{**STEPS, "data.source": root})
    train_uri, _ = resolve_data(cfg, str(tmp_path / "run"))
    assert train_uri.endswith("/shards")
    result = run_ingest(cfg.data, train_uri)
    assert result.rows_in == result.rows_accepted == stats["rows_out"]
    batch = result.train.take_batch(8)
    assert batch[schema.PIXELS].shape == (8, 3, cfg.data.image_size, cfg.data.image_size)
    assert (batch[schema.LABEL] >= 0).all()          # the sidecar's labels came through


def test_streaming_curation_prefix_matches_the_job(curated, tmp_path) -> None:
    _, stats = curated["webdataset"]
    cfg = vlmray.recipe("clip_tiny", **{
        **STEPS, "data.curate": True, **{f"data.synthetic.{k}": v for k, v in vars(SYN).items()}})
    m = vlmray.run(cfg, output=str(tmp_path / "run")).metrics
    assert m["rows_in"] == stats["rows_in"] == 400
    assert m["rows_accepted"] == stats["rows_out"]
    assert m["reject_reasons"] == stats["reject_reasons"]
    assert not (Path(tmp_path / "run") / "shards").exists()       # no curated copy written
    rejects = json.loads((Path(tmp_path / "run") / "metrics.json").read_text())["reject_reasons"]
    assert rejects.get("near_duplicate_image", 0) >= 15 and rejects.get("junk_alt_text", 0) >= 15
