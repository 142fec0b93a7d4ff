"""A whole run on S3 (moto's server on 127.0.0.1): a URL list stored at ``s3://``, images from a
real HTTP server on 127.0.0.1, and everything the run writes under an ``s3://`` run dir: the
staged download (``curation/staged``), the dedup decisions, ``rejects/``, checkpoints and
metrics. A second plan over the same cache downloads nothing.

    pytest tests/train/test_url_training_s3.py -q
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vlmray
from tests.plugins.http_server import LoopbackServer, body, status
from tests.train.test_pipeline_ray import SMALL
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.storage import arrow_filesystem, exists, filesystem, join
from vlmray.data.synthetic import make_shard, write_synthetic
from vlmray.train.checkpoint import find_latest

GOOD = 32
SYN = SyntheticConfig(num_train=GOOD, num_eval=32, shard_size=GOOD, mismatch_frac=0.0,
                      junk_frac=0.0, near_dup_frac=0.0, corrupt_frac=0.0, overlong_frac=0.0)
HTML = b"<html><body>moved</body></html>"
BAD = {"/gone.jpg": (status(404), "download_http_error"),
       "/page.html": (body(HTML, "text/html"), "decode_error")}
RUN = {**SMALL, "train.steps": 4, "train.batch_size": 16, "train.checkpoint_every": 4,
       "train.log_every": 2, "eval.every": 0, "eval.max_samples": 32, "data.curate": True,
       "data.curation.download.timeout_s": 2.0, "data.curation.download.retries": 0,
       "data.curation.download.allow_hosts": ["127.0.0.1"]}      # the test server's address


# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    import boto3

    name = f"urls-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@functools.cache
def _samples() -> list[dict]:
    """The clean built-in samples the server hands out (JPEG bytes, caption)."""
    return make_shard(SYN, "train", 0)


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackServer]:
    routes = {f"/img/{s[schema.KEY]}.jpg": body(s[schema.IMAGE], "image/jpeg")
              for s in _samples()}
    routes.update({p: route for p, (route, _) in BAD.items()})
    with LoopbackServer(routes) as srv:
        yield srv


def _good_rows(srv: LoopbackServer) -> list[dict[str, str]]:
    return [{"key": s[schema.KEY], "url": srv.url(f"/img/{s[schema.KEY]}.jpg"),
             "caption": s[schema.TEXT]} for s in _samples()]


def _write_list(rows: list[dict[str, str]], uri: str) -> None:
    """An img2dataset-style URL list as parquet (key, url, caption; no image column)."""
    fs, path = arrow_filesystem(uri)
    table = pa.table({c: [r[c] for r in rows] for c in ("key", "url", "caption")})
    pq.write_table(table, path, filesystem=fs)


@pytest.fixture(scope="module")
def s3_run(ray_local, server, bucket) -> tuple[vlmray.RunResult, str, list]:
    bad = [{"key": f"bad{i}", "url": server.url(p), "caption": f"a bad row at {p}"}
           for i, p in enumerate(BAD)]
    good = _good_rows(server)
    rows = good[:10] + bad[:1] + good[10:20] + bad[1:] + good[20:]
    source = f"{bucket}/lists/urls.parquet"
    _write_list(rows, source)
    write_synthetic(SYN, f"{bucket}/data")                    # the held-out split, on S3 too
    cfg = vlmray.recipe("clip_tiny", **{**RUN, "data.source": source,
                                        "data.eval_source": f"{bucket}/data/eval"})
    return vlmray.run(cfg, output=f"{bucket}/runs/u"), source, rows


def _read_json(uri: str) -> dict:
    fs, path = filesystem(uri)
    return json.loads(fs.cat_file(path))


def test_run_on_s3_accounts_for_every_url(s3_run) -> None:
    result, _, rows = s3_run
    assert result.run_dir.startswith("s3://")
    m = _read_json(join(result.run_dir, "metrics.json"))
    assert m["steps"] == 4 and m["samples_seen"] == 4 * 16 > GOOD
    assert m["rows_in"] == len(rows) == m["rows_accepted"] + m["rows_rejected"]
    assert m["rows_accepted"] == GOOD
    assert m["reject_reasons"] == {reason: 1 for _, reason in BAD.values()}
    assert m["zero_shot_top1"] is not None                   # evaluated on the S3 eval split


def test_rejects_and_checkpoint_are_on_s3(s3_run) -> None:
    result, _, _ = s3_run
    fs, path = arrow_filesystem(join(result.run_dir, "rejects"))
    table = pq.read_table(path, filesystem=fs).to_pylist()
    assert {r[schema.KEY]: r[schema.REJECT_REASON] for r in table} == {
        f"bad{i}": reason for i, (_, reason) in enumerate(BAD.values())}
    assert result.checkpoint and result.checkpoint.startswith(result.run_dir.removeprefix("s3://"))
    latest = find_latest(join(result.run_dir, "ray"))
    assert isinstance(latest, str) and latest.startswith("s3://")


def test_staged_download_is_on_s3_and_read_back_without_fetching(s3_run, server) -> None:
    from vlmray.pipelines.feed import source_plan

    result, source, rows = s3_run
    cache = join(result.run_dir, "curation")
    done = _read_json(join(cache, "staged", "_SUCCESS"))
    assert done["rows"].startswith("s3://") and exists(join(cache, "_SUCCESS"))
    fs, path = arrow_filesystem(done["rows"])
    staged = pq.read_table(path, filesystem=fs, columns=[schema.KEY, schema.REJECT_REASON])
    assert staged.num_rows == len(rows)                      # every URL once, bad ones too
    assert all(server.hits[f"/img/{r['key']}.jpg"] == 1 for r in _good_rows(server))
    before = dict(server.hits)
    cfg = vlmray.recipe("clip_tiny", **{**RUN, "data.source": source})
    src = source_plan(cfg.data, source, cache)               # the cache a resume would use
    assert src.staged.startswith("s3://") and src.read().count() == len(rows)
    assert dict(server.hits) == before                       # nothing downloaded again
    assert [s.name for s in src.stages] == ["dedup"]         # only the cached decisions


def test_curation_job_reads_the_list_from_s3_and_resumes_from_s3_staging(s3_run, server,
                                                                          bucket) -> None:
    """``vlmray/pipelines/curate.py`` on the same list, output on S3: downloads each URL once more
    (its own staging), writes shards and rejects there; after a crash past staging (shards
    and stats gone, ``_staging`` kept) a rerun finishes from the staged rows, fetching
    nothing."""
    from vlmray.config.curation import WriteConfig
    from vlmray.config.inputs import DownloadConfig
    from vlmray.config.jobs import CurateJobConfig
    from vlmray.data.shards import iter_shards
    from vlmray.data.storage import remove
    from vlmray.pipelines.curate import Layout, run

    _, source, rows = s3_run
    before = dict(server.hits)
    job = CurateJobConfig(input=source, output=f"{bucket}/curated", keep_staging=True,
                          download=DownloadConfig(timeout_s=2.0, retries=0,
                                                  allow_hosts=["127.0.0.1"]),
                          write=WriteConfig(shard_size=12))
    stats = run(job).stats
    assert (stats["rows_in"], stats["rows_out"]) == (len(rows), GOOD)
    assert stats["reject_reasons"] == {reason: 1 for _, reason in BAD.values()}
    fetched = {p: server.hits[p] - before.get(p, 0) for p in server.hits}
    assert all(fetched[f"/img/{r['key']}.jpg"] == 1 for r in _good_rows(server))
    layout = Layout(job.output)
    shards = {s[schema.KEY]: s[schema.IMAGE] for s in iter_shards(layout.shards)}
    assert sorted(shards) == sorted(r["key"] for r in _good_rows(server))

    for done in (layout.shards, layout.stats, layout.rejects):   # it died after staging
        remove(done)
    after_first = dict(server.hits)
    again = run(job).stats
    assert dict(server.hits) == after_first                  # the staged rows were read back
    assert {k: again[k] for k in ("rows_in", "rows_out", "reject_reasons")} == {
        k: stats[k] for k in ("rows_in", "rows_out", "reject_reasons")}
    assert {s[schema.KEY]: s[schema.IMAGE] for s in iter_shards(layout.shards)} == shards
