"""Shard I/O and storage: local and s3:// (a real moto server), byte-stable tars."""

from __future__ import annotations

import json
import sys
import tarfile

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vlmray.config.data import SyntheticConfig
from vlmray.data.schema import IMAGE, KEY, META, TEXT, WDS_SUFFIX
from vlmray.data.shards import (
    encode_shard,
    iter_shard,
    iter_shards,
    list_shards,
    load_classes,
    write_shard,
)
from vlmray.data.storage import arrow_filesystem, filesystem, join
from vlmray.data.synthetic import CLASSNAMES, make_shard, write_synthetic


def _samples(n: int, prefix: str = "s") -> list[dict]:
    return [{KEY: f"{prefix}{i:03d}", IMAGE: bytes([i % 256]) * (i + 1), TEXT: f"caption {i} é",
             META: json.dumps({"i": i})} for i in range(n)]


def test_round_trip_keeps_order_and_fields(tmp_path):
    samples = _samples(5)
    assert write_shard(str(tmp_path), "a/shard-00000.tar", samples) == 5
    back = list(iter_shard(str(tmp_path / "a/shard-00000.tar")))
    assert back == samples


def test_members_follow_the_webdataset_layout(tmp_path):
    write_shard(str(tmp_path), "x.tar", _samples(2))
    with tarfile.open(tmp_path / "x.tar") as tar:
        members = tar.getmembers()
    suffixes = [WDS_SUFFIX[c] for c in (IMAGE, TEXT, META)]
    assert [m.name for m in members] == [f"s{i:03d}.{s}" for i in range(2) for s in suffixes]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}


def test_encoding_is_byte_stable_and_content_sensitive():
    first, _ = encode_shard(_samples(4))
    assert first == encode_shard(_samples(4))[0]
    changed = _samples(4)
    changed[2][TEXT] = "other"
    assert first != encode_shard(changed)[0]


def test_missing_members_read_as_none(tmp_path):
    fs, path = filesystem(str(tmp_path / "m.tar"))
    write_shard(fs, path, [{KEY: "only", TEXT: "no image"}])
    assert list(iter_shard(str(tmp_path / "m.tar"))) == \
        [{KEY: "only", IMAGE: None, TEXT: "no image", META: None}]


@pytest.mark.parametrize("key", ["a.b", "x/y", ""])
def test_bad_keys_are_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="key"):
        write_shard(str(tmp_path), "bad.tar", [{KEY: key, TEXT: "t"}])


def test_list_shards_directory_glob_and_file(tmp_path):
    for name in ("shard-00002.tar", "shard-00000.tar", "shard-00001.tar"):
        write_shard(str(tmp_path), name, _samples(1, prefix=name[6:11]))
    (tmp_path / "manifest.parquet").write_bytes(b"not a shard")
    expected = [str(tmp_path / f"shard-0000{i}.tar") for i in range(3)]
    assert list_shards(str(tmp_path)) == expected
    assert list_shards(str(tmp_path / "shard-0000[01].tar")) == expected[:2]
    assert list_shards(expected[1]) == [expected[1]]
    assert [s[KEY] for s in iter_shards(str(tmp_path))] == ["00000000", "00001000", "00002000"]
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nope"))


def test_join_and_filesystems(tmp_path):
    assert join("s3://b/ds/", "train", "/shard.tar") == "s3://b/ds/train/shard.tar"
    assert join("/tmp/x", "a/", "") == "/tmp/x/a"
    fs, path = filesystem("relative/dir")
    assert path.startswith("/") and path.endswith("relative/dir")
    afs, apath = arrow_filesystem(str(tmp_path))
    assert isinstance(afs, pafs.LocalFileSystem) and apath == str(tmp_path)


def test_missing_s3fs_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(ImportError, match="pip install s3fs"):
        filesystem("s3://bucket/x")


def test_s3_shard_round_trip(s3_bucket):
    uri = join(s3_bucket, "raw")
    write_shard(uri, "shard-00000.tar", _samples(3))
    assert list_shards(uri) == [f"{uri}/shard-00000.tar"]
    assert list(iter_shards(uri)) == _samples(3)


def test_write_synthetic_to_s3_reads_back(s3_bucket):
    cfg = SyntheticConfig(num_train=40, num_eval=10, shard_size=15, image_size=32)
    root = join(s3_bucket, "ds")
    summary = write_synthetic(cfg, root)
    shards = list_shards(join(root, "train"))
    assert shards == [f"{root}/train/shard-0000{i}.tar" for i in range(3)]
    keys = [s[KEY] for s in iter_shards(join(root, "train"))]
    assert keys == [f"train-{i:09d}" for i in range(40)]
    assert summary["splits"]["train"]["num_samples"] == 40
    classnames, templates = load_classes(join(root, "eval"))
    assert classnames == CLASSNAMES and templates
    afs, path = arrow_filesystem(join(root, "train", "manifest.parquet"))
    assert isinstance(afs, pafs.PyFileSystem)
    assert pq.read_table(path, filesystem=afs).column(KEY).to_pylist() == keys
    fs, path = filesystem(join(root, "train", "shard-00001.tar"))
    assert fs.cat_file(path) == encode_shard(make_shard(cfg, "train", 1))[0]


def test_s3_parallel_write_matches_local(s3_bucket, tmp_path):
    cfg = SyntheticConfig(num_train=20, num_eval=4, shard_size=10, image_size=16)
    write_synthetic(cfg, str(tmp_path), workers=1)
    write_synthetic(cfg, join(s3_bucket, "par"), workers=2)
    fs, path = filesystem(join(s3_bucket, "par", "train", "shard-00001.tar"))
    assert fs.cat_file(path) == (tmp_path / "train/shard-00001.tar").read_bytes()


def test_s3_objects_land_on_the_moto_server(s3_bucket, s3_server):
    import boto3

    write_shard(s3_bucket, "p/shard-00000.tar", _samples(1))       # at the bucket root too
    write_synthetic(SyntheticConfig(num_train=2, num_eval=1, image_size=16), s3_bucket)
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket[5:])
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "dataset.json", "eval/classes.json", "eval/manifest.parquet", "eval/shard-00000.tar",
        "p/shard-00000.tar", "train/manifest.parquet", "train/shard-00000.tar"]
