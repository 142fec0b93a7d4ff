"""Training from an img2dataset-style URL list served by a real HTTP server on 127.0.0.1.

Good URLs serve the built-in dataset's JPEGs; among them are URLs to a closed loopback port,
404s, a stalled drip and a trickle slower than the download may take, and HTML pages. Each bad
URL is rejected with its reason, counted and written to ``rejects/`` without holding up the
stream; the list is downloaded once however many epochs train on it, and a resumed run reads
the staged rows back instead of downloading again.

    pytest tests/train/test_url_training.py -q
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import vlmray
from tests.plugins.http_server import LoopbackServer, body, closed_port, drip, status
from tests.train.test_pipeline_ray import SMALL
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.synthetic import make_shard

GOOD = 40
SYN = SyntheticConfig(num_train=GOOD, num_eval=1, shard_size=GOOD, mismatch_frac=0.0,
                      junk_frac=0.0, near_dup_frac=0.0, corrupt_frac=0.0, overlong_frac=0.0)
HTML = b"<!doctype html><html><body><h1>Not an image</h1></body></html>"
TIMEOUT_S, DEADLINE_S = 1.0, 2.5      # generous: good images must not time out on a busy box
BAD = {                                   # path -> (route, expected reason); "" = closed port
    "/missing-1.jpg": (status(404), "download_http_error"),
    "/missing-2.jpg": (status(404), "download_http_error"),
    "/stalled.jpg": (drip(50_000, 3 * TIMEOUT_S, max_s=4.0), "download_timeout"),
    "/trickle.jpg": (drip(50_000, TIMEOUT_S / 4, max_s=10.0), "download_timeout"),
    "/page.html": (body(HTML, "text/html"), "decode_error"),
    "/landing.jpg": (body(HTML, "text/html"), "decode_error"),
    "/unreachable-1.jpg": (None, "download_error"),
    "/unreachable-2.jpg": (None, "download_error"),
}
RUN = {**SMALL, "train.steps": 6, "train.batch_size": 16, "train.checkpoint_every": 0,
       "train.log_every": 3, "eval.every": 0, "data.curate": True, "data.shuffle_buffer": 0,
       "data.curation.download.timeout_s": TIMEOUT_S,
       "data.curation.download.deadline_s": DEADLINE_S,
       "data.curation.download.retries": 1, "data.curation.download.backoff_s": 0.05,
       "data.curation.download.allow_hosts": ["127.0.0.1"]}      # the test server's address


def _good_path(key: str) -> str:
    return f"/img/{key}.jpg"


@functools.cache
def _samples() -> list[dict]:
    """The clean built-in samples the server hands out (JPEG bytes, caption)."""
    return make_shard(SYN, "train", 0)


def _captions() -> dict[str, str]:
    """Good path -> its caption."""
    return {_good_path(s[schema.KEY]): s[schema.TEXT] for s in _samples()}


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackServer]:
    routes = {_good_path(s[schema.KEY]): body(s[schema.IMAGE], "image/jpeg")
              for s in _samples()}
    routes.update({path: route for path, (route, _) in BAD.items() if route is not None})
    with LoopbackServer(routes) as srv:
        yield srv


def _url_rows(srv: LoopbackServer) -> list[dict[str, str]]:
    """Good and bad URLs interleaved, as a crawl's list would have them."""
    dead = closed_port()
    bad = [{"url": f"http://127.0.0.1:{dead}{p}" if route is None else srv.url(p),
            "caption": f"a picture of something at {p}"} for p, (route, _) in BAD.items()]
    good = [{"url": srv.url(p), "caption": c} for p, c in _captions().items()]
    step = len(good) // len(bad)
    rows: list[dict[str, str]] = []
    for i, row in enumerate(good):
        rows.append(row)
        if i % step == step - 1 and bad:
            rows.append(bad.pop(0))
    return rows + bad


def _write_csv(rows: list[dict[str, str]], path: Path) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def url_run(ray_local, server, tmp_path_factory) -> tuple[vlmray.RunResult, list]:
    tmp = tmp_path_factory.mktemp("urls")
    rows = _url_rows(server)
    source = _write_csv(rows, tmp / "urls.csv")
    cfg = vlmray.recipe("clip_tiny", **{**RUN, "data.source": source})
    return vlmray.run(cfg, output=str(tmp / "run")), rows


def _expected_reasons() -> dict[str, int]:
    out: dict[str, int] = {}
    for _, reason in BAD.values():
        out[reason] = out.get(reason, 0) + 1
    return out


def test_every_bad_url_is_rejected_with_its_reason(url_run) -> None:
    result, rows = url_run
    m = result.metrics
    assert m["steps"] == 6 and m["samples_seen"] == 6 * 16     # the stream never stalled
    assert m["rows_in"] == len(rows) == GOOD + len(BAD)
    assert m["rows_in"] == m["rows_accepted"] + m["rows_rejected"]
    assert m["reject_reasons"] == _expected_reasons()
    assert m["rows_accepted"] == GOOD


def test_rejects_name_each_bad_url_once_with_its_stage(url_run) -> None:
    result, rows = url_run
    table = pq.read_table(Path(result.run_dir) / "rejects").to_pylist()
    assert len(table) == len(BAD)
    by_caption = {r[schema.TEXT]: r for r in table}
    for path, (_, reason) in BAD.items():
        r = by_caption[f"a picture of something at {path}"]
        assert r[schema.REJECT_REASON] == reason
        assert r[schema.REJECT_STAGE] == ("image" if reason == "decode_error" else "download")


def test_each_good_image_is_downloaded_once_across_epochs(url_run, server) -> None:
    result, _ = url_run
    assert result.metrics["samples_seen"] > GOOD              # more than one epoch read
    assert all(server.hits[p] == 1 for p in _captions()), {
        p: server.hits[p] for p in _captions() if server.hits[p] != 1}
    assert server.hits["/missing-1.jpg"] == 1                 # a 404 is not retried
    assert server.hits["/stalled.jpg"] == 2                   # a timeout is, once
    staged = json.loads((Path(result.run_dir) / "curation/staged/_SUCCESS").read_text())
    table = pq.read_table(staged["rows"], columns=[schema.URL, schema.IMAGE,
                                                  schema.REJECT_REASON]).to_pylist()
    assert len(table) == GOOD + len(BAD)                      # every URL staged once
    for row in table:                                         # images kept for the live rows
        assert bool(row[schema.IMAGE]) == (row[schema.REJECT_REASON] == ""), row[schema.URL]


def test_resume_reads_the_staged_rows_without_downloading(url_run, server) -> None:
    result, rows = url_run
    before = dict(server.hits)
    source = json.loads((Path(result.run_dir) / "config.json").read_text())["data"]["source"]
    cfg = vlmray.recipe("clip_tiny", **{**RUN, "train.steps": 7, "data.source": source})
    again = vlmray.run(cfg, output=result.run_dir, resume=True)
    assert dict(server.hits) == before                        # nothing fetched again
    m = again.metrics
    assert m["steps"] == 7 and m["samples_seen"] == 7 * 16   # continued from step 6
    assert (m["rows_in"], m["rows_accepted"]) == (len(rows), GOOD)
    assert m["reject_reasons"] == _expected_reasons()
    keys = pq.read_table(Path(result.run_dir) / "rejects").column(schema.KEY).to_pylist()
    assert len(keys) == len(set(keys)) == len(BAD)            # rejects not written twice


def test_url_list_without_curation_is_downloaded_and_decoded(ray_local, server, tmp_path) -> None:
    """``data.curate=false``: only the downloader runs before decode; the same reasons come
    out (a page fails to decode in the decode stage), and a second plan over the same cache
    fetches nothing. Runs last: its own cache downloads the good images once more."""
    from vlmray.pipelines.feed import run_ingest

    rows = _url_rows(server)
    source = _write_csv(rows, tmp_path / "urls.csv")
    cfg = vlmray.recipe("clip_tiny", **{**RUN, "data.curate": False, "data.source": source})
    before = dict(server.hits)
    kw = {"rejects_uri": str(tmp_path / "rejects"), "cache_root": str(tmp_path / "curation")}
    result = run_ingest(cfg.data, source, **kw)
    assert (result.rows_in, result.rows_accepted) == (len(rows), GOOD)
    assert result.reject_reasons == _expected_reasons()
    assert all(server.hits[p] - before.get(p, 0) == 1 for p in _captions())
    stages = {r[schema.REJECT_REASON]: r[schema.REJECT_STAGE]
              for r in pq.read_table(tmp_path / "rejects").to_pylist()}
    assert stages["decode_error"] == "decode" and stages["download_timeout"] == "download"
    fetched = dict(server.hits)
    assert run_ingest(cfg.data, source, **kw).summary() == result.summary()
    assert dict(server.hits) == fetched
