"""``jobs/build_index.py`` on a real local Ray: the built-in data end to end (split, decode
rejects, two indexes), the same to S3 through moto's server, and the command line.

    pytest tests/retrieval/test_build_index_job.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.build_index import main
from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config import field_paths
from vlmray.config.data import SyntheticConfig
from vlmray.config.jobs import IndexJobConfig
from vlmray.config.retrieval import EmbedConfig
from vlmray.data import schema
from vlmray.data.storage import filesystem, join
from vlmray.pipelines.index import load_built, run
from vlmray.retrieval.embed import read_embedding_table, read_embeddings
from vlmray.retrieval.index import IndexConfig
from vlmray.retrieval.split import reference_mask

SYN = SyntheticConfig(num_train=240, num_eval=8, shard_size=80, corrupt_frac=0.05,
                      near_dup_frac=0.0, mismatch_frac=0.0, junk_frac=0.0, overlong_frac=0.0)


# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("run")
    save_tiny_checkpoint(run)
    return str(run)


@pytest.fixture(scope="module")
def local(ray_local, run_dir, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("idx") / "out")
    job = IndexJobConfig(output=out, synthetic=SYN, subset="train", reference_fraction=0.25,
                         embed=EmbedConfig(model=run_dir, modality="both", batch_size=32),
                         index=IndexConfig(kind="ivf_flat"), shards=3, holdout_queries=50)
    return out, run(job)


def test_every_row_is_embedded_rejected_or_outside(local) -> None:
    out, stats = local
    assert stats["rows_in"] == SYN.num_train
    assert stats["rows_in"] == (stats["rows_embedded"] + stats["rows_rejected"]
                                + stats["rows_outside_subset"])
    assert stats["reject_reasons"] == {"decode_error": stats["rows_rejected"]}
    assert stats["rows_rejected"] >= 1 and 30 < stats["rows_outside_subset"] < 90
    rejects = pq.read_table(join(out, "rejects", "rejects.parquet")).to_pylist()
    assert len(rejects) == stats["rows_rejected"]
    assert {r[schema.REJECT_REASON] for r in rejects} == {"decode_error"}
    assert json.loads(Path(out, "stats.json").read_text())["rows_in"] == SYN.num_train


def test_embeddings_cover_the_train_split_only(local) -> None:
    out, stats = local
    table = read_embedding_table(join(out, "embeddings"))
    assert set(table.column_names) == {schema.KEY, schema.TEXT, schema.IMAGE_EMBED,
                                       schema.TEXT_EMBED}
    keys = table.column(schema.KEY).to_pylist()
    assert len(keys) == len(set(keys)) == stats["rows_embedded"]
    assert not reference_mask(keys, 0.25).any()                   # reference rows held out
    _, vec = read_embeddings(join(out, "embeddings"), schema.IMAGE_EMBED)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)


def test_indexes_are_tuned_and_keys_line_up(local) -> None:
    out, stats = local
    keys, vec = read_embeddings(join(out, "embeddings"), schema.IMAGE_EMBED)
    for name in ("image", "text"):
        r = stats["indexes"][name]
        assert r["kind"] == "ivf_flat" and r["n"] == stats["rows_embedded"] and r["shards"] == 3
        assert r["recall_at_10"] >= 0.9 and r["nprobe"] >= 1 and r["bytes"] > 0
    image = load_built(out, "image")
    assert sorted(image.keys) == sorted(keys)
    scores, hits = image.search(vec[:20], 1)
    assert list(hits[:, 0]) == list(keys[:20]) and (scores[:, 0] > 0.999).all()


def test_build_index_job_to_s3(run_dir, s3_bucket, capsys) -> None:
    out = join(s3_bucket, "idx")
    code = main(["--output", out, "--embed.model", run_dir, "--embed.modality", "text",
                 "--synthetic.num_train", "120", "--synthetic.shard_size", "60",
                 "--synthetic.num_eval", "4", "--holdout_queries", "20"])
    assert code == 0
    line = [s for s in capsys.readouterr().out.splitlines() if "recall@10=" in s]
    assert len(line) == 1 and "text" in line[0] and out in line[0]
    fs, path = filesystem(join(out, "stats.json"))
    stats = json.loads(fs.cat_file(path))
    assert list(stats["indexes"]) == ["text"]
    assert stats["rows_embedded"] + stats["rows_rejected"] == stats["rows_in"] == 120
    built = load_built(out, "text")
    keys, vec = read_embeddings(join(out, "embeddings"), schema.TEXT_EMBED)
    assert built.index.ntotal == len(keys) == stats["rows_embedded"]
    scores, _ = built.search(vec[:5], 3)
    assert scores.shape == (5, 3) and (scores[:, 0] > 0.999).all()


def test_help_documents_every_field(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in field_paths(IndexJobConfig()):
        assert f"--{name}" in text, name
    assert "(default: 'both')" in text and "recall@10" in text


def test_unknown_flag_names_valid_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--output", "x", "--embed.modle", "minilm"])
    err = capsys.readouterr().err
    assert "embed.modle" in err and "embed.model" in err and "holdout_queries" in err
    with pytest.raises(SystemExit):
        main(["--output", "x", "--embed.model", "minilm"])         # minilm + images
    assert "text only" in capsys.readouterr().err
