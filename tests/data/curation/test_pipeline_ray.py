"""The curation job on a real local Ray: built-in noisy data, the bad-input corpus, determinism,
resuming after a kill, and S3 in and out through moto's server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.data.curation.corpus import bad_rows
from vlmray.config.curation import WriteConfig
from vlmray.config.data import SyntheticConfig
from vlmray.config.inputs import DownloadConfig
from vlmray.config.jobs import CurateJobConfig
from vlmray.data import schema
from vlmray.data.shards import encode_shard, iter_shards
from vlmray.data.storage import filesystem, join
from vlmray.data.synthetic import write_synthetic
from vlmray.pipelines.curate import EXIT_AFTER_STAGING, run

ROOT = Path(__file__).resolve().parents[3]
SYN = SyntheticConfig(num_train=400, num_eval=20, shard_size=100, corrupt_frac=0.03,
                      overlong_frac=0.02, near_dup_frac=0.08, junk_frac=0.05)


# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("raw"))
    write_synthetic(SYN, root)
    return root


def _job(input_: str, output: str, **kw) -> CurateJobConfig:
    return CurateJobConfig(input=input_, output=output,
                           write=WriteConfig(shard_size=kw.pop("shard_size", 150), **kw))


def _shard_bytes(output: str) -> dict[str, bytes]:
    fs, path = filesystem(join(output, "shards"))
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.ls(path, detail=False))}


def _rejects(output: str) -> list[dict]:
    fs, path = filesystem(join(output, "rejects"))
    rows = []
    for p in sorted(fs.ls(path, detail=False)):
        with fs.open(p, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


@pytest.fixture(scope="module")
def curated(ray_local, raw, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("cur") / "out")
    return out, run(_job(f"{raw}/train", out)).stats


def test_builtin_curation_accounts_for_every_row(curated) -> None:
    out, stats = curated
    assert stats["rows_in"] == 400
    assert stats["rows_out"] + stats["rows_rejected"] == 400
    names = [s["name"] for s in stats["stages"]]
    assert names == ["text", "image", "dedup"]
    for before, after in zip(stats["stages"], stats["stages"][1:]):
        assert after["in"] == before["kept"]
    for st in stats["stages"]:
        assert st["in"] - st["kept"] == sum(st["dropped"].values())
    reasons = stats["reject_reasons"]
    assert reasons["decode_error"] == 12 and reasons["text_too_long"] == 8
    assert reasons["junk_alt_text"] >= 15 and reasons["near_duplicate_image"] >= 20
    kept = list(iter_shards(join(out, "shards")))
    assert len(kept) == stats["rows_out"]
    sizes = [len(list(iter_shards(join(out, "shards", n)))) for n in sorted(_shard_bytes(out))]
    assert sizes[:-1] == [150] * (stats["shards"] - 1)
    rejects = _rejects(out)
    assert len(rejects) == stats["rows_rejected"]
    assert {r[schema.KEY] for r in rejects}.isdisjoint({s[schema.KEY] for s in kept})
    assert all(r[schema.REJECT_REASON] and r[schema.REJECT_STAGE] in names for r in rejects)
    noise = stats["builtin_noise"]
    assert noise["corrupt"]["rejected"] == noise["corrupt"]["rows"]
    assert noise["near_dup"]["rejected"] >= 0.8 * noise["near_dup"]["rows"]


def test_same_input_gives_byte_identical_shards(curated, raw, tmp_path) -> None:
    out, stats = curated
    again = run(_job(f"{raw}/train", str(tmp_path / "again"))).stats
    assert _shard_bytes(out) == _shard_bytes(str(tmp_path / "again"))
    assert again["stages"] == stats["stages"]


def test_resume_after_kill_and_lost_shard(curated, raw, tmp_path) -> None:
    out, _ = curated
    target = str(tmp_path / "resumed")
    cmd = [sys.executable, str(ROOT / "jobs/curate.py"), "--input", f"{raw}/train",
           "--output", target, "--write.shard_size", "150"]
    env = {**os.environ, EXIT_AFTER_STAGING: "1", "RAY_ADDRESS": ""}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert os.path.exists(f"{target}/_staging/_SUCCESS") and not os.path.exists(f"{target}/shards")
    run(_job(f"{raw}/train", target))            # resumes from _staging
    assert _shard_bytes(target) == _shard_bytes(out)
    shards = sorted(Path(target, "shards").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    Path(target, "stats.json").unlink()
    stats = run(_job(f"{raw}/train", target)).stats
    assert stats["shards_written"] == 1 and stats["shards_skipped"] == len(shards) - 1
    assert _shard_bytes(target) == _shard_bytes(out)
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in shards if p != shards[1])


def test_bad_input_corpus_through_ray(ray_local, tmp_path) -> None:
    rows = bad_rows()
    dup = {**rows[-1], "expect_reason": "duplicate_key", "expect_repair": ""}
    samples = [{k: r[k] for k in (schema.KEY, schema.IMAGE, schema.TEXT, schema.META)}
               for r in [*rows, dup]]
    src = tmp_path / "in"
    src.mkdir()
    (src / "corpus.tar").write_bytes(encode_shard(samples)[0])
    stats = run(_job(str(src), str(tmp_path / "out"))).stats
    expected = {r[schema.KEY]: r["expect_reason"] for r in rows}
    got = {r[schema.KEY]: r[schema.REJECT_REASON] for r in _rejects(str(tmp_path / "out"))}
    kept = {s[schema.KEY]: s for s in iter_shards(str(tmp_path / "out/shards"))}
    for key, reason in expected.items():
        if reason:
            assert got.get(key) == reason, key
        else:
            assert key in kept, key
    assert list(got.values()).count("duplicate_key") == 1
    assert stats["rows_in"] == len(samples) == len(kept) + len(got)
    repaired = {r["expect_repair"] for r in rows if r["expect_repair"]}
    seen = {rep for s in kept.values() for rep in json.loads(s[schema.META]).get("repairs", "")
            .split(";") if rep}
    assert repaired <= seen


def test_s3_in_and_out_match_local(curated, raw, s3_bucket) -> None:
    out, stats = curated
    fs, _ = filesystem(s3_bucket)
    for p in sorted(Path(raw, "train").glob("*.tar")):
        fs.pipe_file(f"{s3_bucket[5:]}/raw/{p.name}", p.read_bytes())
    s3_out = f"{s3_bucket}/curated"
    s3_stats = run(_job(f"{s3_bucket}/raw", s3_out)).stats
    assert s3_stats["rows_out"] == stats["rows_out"]
    assert s3_stats["reject_reasons"] == stats["reject_reasons"]
    assert _shard_bytes(s3_out).keys() == _shard_bytes(out).keys()
    assert len(_rejects(s3_out)) == stats["rows_rejected"]


def test_parquet_output(ray_local, raw, tmp_path) -> None:
    stats = run(_job(f"{raw}/train", str(tmp_path / "pq"), format="parquet")).stats
    table = pq.read_table(str(tmp_path / "pq/shards"))
    assert table.num_rows == stats["rows_out"]
    assert set(table.column_names) >= {schema.KEY, schema.IMAGE, schema.TEXT, schema.META}


@pytest.fixture()
def http_images(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a directory of images."""
    import functools
    import http.server
    import threading

    from tests.data.curation.corpus import bad_rows

    served = tmp_path / "www"
    served.mkdir()
    good = [r for r in bad_rows() if not r["expect_reason"] and not r["expect_repair"]]
    for i, r in enumerate(good):
        (served / f"{i}.jpg").write_bytes(r[schema.IMAGE])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", len(good)
    server.shutdown()


def test_url_list_downloads_through_ray(ray_local, http_images, tmp_path) -> None:
    base, n = http_images
    lines = ["url,caption"] + [f"{base}/{i}.jpg,a photo number {i} of a thing" for i in range(n)]
    lines += [f"{base}/missing.jpg,a photo that is gone", "ftp://example/x.jpg,a bad scheme"]
    (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
    job = _job(str(tmp_path / "urls.csv"), str(tmp_path / "out"))
    job.download = DownloadConfig(allow_hosts=["127.0.0.1"])     # the test server's address
    stats = run(job).stats
    assert [s["name"] for s in stats["stages"]][0] == "download"
    assert stats["reject_reasons"] == {"download_http_error": 1, "download_error": 1}
    kept = list(iter_shards(str(tmp_path / "out/shards")))
    assert len(kept) == stats["rows_out"] == n
    assert all(json.loads(s[schema.META])["url"].startswith(base) for s in kept)
