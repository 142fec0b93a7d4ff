"""Readers on real files: webdataset tars (duplicate keys, raw text bytes, truncation), parquet
with image bytes or relative paths, URL lists, s3:// through moto's server, and Ray Data; the
curation job counting the rows the read refuses."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmray.cli import field_docs
from vlmray.config.curation import WriteConfig
from vlmray.config.inputs import ReadConfig
from vlmray.config.jobs import CurateJobConfig
from vlmray.data import schema
from vlmray.data.curation.readers import (
    COLUMNS,
    READ_REASONS,
    list_inputs,
    read_file,
    read_inputs,
    read_inputs_local,
)
from vlmray.data.shards import encode_shard, iter_shards
from vlmray.data.storage import filesystem, join
from vlmray.pipelines.curate import run

# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(n: int, prefix: str = "s", size: int = 700) -> list[dict]:
    return [{schema.KEY: f"{prefix}{i:03d}", schema.IMAGE: bytes([i]) * size,
             schema.TEXT: f"caption {i}", schema.META: json.dumps({"i": i})} for i in range(n)]


def _write_parquet(path: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def _row_ids(file_index: int, n: int) -> list[int]:
    return [(file_index << 32) | i for i in range(n)]


def test_webdataset_rows_keys_and_missing_members(tmp_path) -> None:
    samples = [{schema.KEY: "a", schema.IMAGE: b"img-a", schema.TEXT: "un chat",
                schema.META: '{"w": 3}'},
               {schema.KEY: "b", schema.IMAGE: b"", schema.TEXT: "zero-byte image"},
               {schema.KEY: "c", schema.TEXT: "no image"}]
    (tmp_path / "00000.tar").write_bytes(encode_shard(samples)[0])
    batch = read_file(str(tmp_path / "00000.tar"), 3, "webdataset", ReadConfig())
    assert sorted(batch) == sorted(COLUMNS)
    assert list(batch[schema.KEY]) == ["a", "b", "c"]
    assert list(batch[schema.IMAGE]) == [b"img-a", b"", None]
    assert list(batch[schema.TEXT]) == [b"un chat", b"zero-byte image", b"no image"]
    assert list(batch[schema.META]) == ['{"w": 3}', None, None]
    assert list(batch[schema.URL]) == ["", "", ""]
    assert set(batch[schema.SOURCE]) == {str(tmp_path / "00000.tar")}
    assert batch[schema.ROW_ID].dtype == np.int64
    assert list(batch[schema.ROW_ID]) == _row_ids(3, 3)


def test_webdataset_duplicate_keys_stay_separate_and_text_is_raw(tmp_path) -> None:
    members = [("a.jpg", b"A1"), ("a.txt", b"\xff\xfe not utf-8"), ("a.cls", b"7"),
               ("b.png", b"B"), ("a.jpg", b"A2"),          # a again, after b
               ("c.jpg", b"C1"), ("c.jpg", b"C2"),         # the same member twice in a row
               ("sub/d.WEBP", b"D"), ("sub/d.json", b"{}"), ("README", b"x")]
    (tmp_path / "dup.tar").write_bytes(_tar(members))
    batch = read_inputs_local(str(tmp_path / "dup.tar"))
    assert list(batch[schema.KEY]) == ["a", "b", "a", "c", "c", "sub_d"]   # sub/d: its path
    assert list(batch[schema.IMAGE]) == [b"A1", b"B", b"A2", b"C1", b"C2", b"D"]
    assert batch[schema.TEXT][0] == b"\xff\xfe not utf-8"        # not decoded
    assert list(batch[schema.TEXT][1:]) == [None] * 5
    assert batch[schema.META][5] == "{}"
    assert list(batch[schema.ROW_ID]) == _row_ids(0, 6)


@pytest.mark.parametrize("cut", ["mid_member", "mid_header", "no_end_marker"])
def test_truncated_tar_keeps_rows_before_the_cut(tmp_path, caplog, cut: str) -> None:
    data = encode_shard(_samples(6))[0]
    # each sample: 3 members of 512-byte header + data padded to 512 (700 B image -> 1024)
    per_sample = 3 * 512 + 1024 + 512 + 512
    at = {"mid_member": 3 * per_sample + 700, "mid_header": 3 * per_sample + 200,
          "no_end_marker": 6 * per_sample}[cut]
    (tmp_path / "cut.tar").write_bytes(data[:at])
    with caplog.at_level(logging.WARNING, logger="vlmray.data.curation.readers"):
        batch = read_inputs_local(str(tmp_path / "cut.tar"))
    complete = 6 if cut == "no_end_marker" else 3
    assert list(batch[schema.KEY][:complete]) == [f"s{i:03d}" for i in range(complete)]
    assert list(batch[schema.TEXT][:complete]) == [f"caption {i}".encode() for i in range(complete)]
    if cut == "mid_member":                      # the sample whose image was cut: no image
        assert batch[schema.KEY][3] == "s003" and batch[schema.IMAGE][3] is None
    assert len(batch[schema.KEY]) == complete + (cut == "mid_member")
    # only the row the cut went through is truncated_shard (a read reject), never the whole rows
    reasons = ["truncated_shard" if cut == "mid_member" and i == 3 else ""
               for i in range(len(batch[schema.KEY]))]
    assert list(batch[schema.REJECT_REASON]) == reasons and "truncated_shard" in READ_REASONS
    assert list(batch[schema.REJECT_STAGE]) == ["read" if r else "" for r in reasons]
    assert any("cut.tar" in r.getMessage() and "truncated" in r.getMessage()
               for r in caplog.records)


def test_garbage_tar_yields_no_rows(tmp_path, caplog) -> None:
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with caplog.at_level(logging.WARNING, logger="vlmray.data.curation.readers"):
        batch = read_file(str(tmp_path / "junk.tar"), 0, "webdataset")
    assert all(len(v) == 0 for v in batch.values()) and "junk.tar" in caplog.text


def test_parquet_image_bytes_and_image_paths(tmp_path) -> None:
    _write_parquet(tmp_path / "a.parquet", {
        "id": [10, 11, 12], "image": [b"I0", None, b""],
        "caption": ["first", None, "third"], "json": ['{"x": 1}', None, None],
        "embedding": [[0.1], [0.2], [0.3]]})
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p0.jpg").write_bytes(b"P0")
    (tmp_path / "abs.jpg").write_bytes(b"ABS")
    _write_parquet(tmp_path / "b.parquet", {
        "image_path": ["imgs/p0.jpg", "imgs/gone.jpg", str(tmp_path / "abs.jpg"), None],
        "text": ["x", "y", "z", "w"]})
    _write_parquet(tmp_path / "c.parquet", {"image": [      # Hugging Face's Image feature
        {"bytes": b"HF", "path": "x.jpg"}, {"bytes": None, "path": "imgs/p0.jpg"}]})
    assert list_inputs(str(tmp_path)) == [(str(tmp_path / f"{n}.parquet"), "parquet")
                                          for n in "abc"]
    batch = read_inputs_local(str(tmp_path), ReadConfig(allow_absolute_paths=True))
    assert list(batch[schema.KEY]) == (["10", "11", "12"] + [f"00001{i:06d}" for i in range(4)]
                                       + ["00002000000", "00002000001"])
    assert list(batch[schema.IMAGE]) == [b"I0", None, b"", b"P0", None, b"ABS", None, b"HF",
                                         b"P0"]
    assert list(batch[schema.TEXT]) == [b"first", None, b"third", b"x", b"y", b"z", b"w", None,
                                        None]
    assert list(batch[schema.META]) == ['{"x": 1}'] + [None] * 8
    assert list(batch[schema.ROW_ID]) == _row_ids(0, 3) + _row_ids(1, 4) + _row_ids(2, 2)


def test_explicit_columns_and_missing_column_error(tmp_path) -> None:
    _write_parquet(tmp_path / "t.parquet", {"uid": ["u1"], "pixels": [b"PX"], "desc": ["d"]})
    cfg = ReadConfig(key_column="uid", image_column="pixels", text_column="desc")
    batch = read_inputs_local(str(tmp_path / "t.parquet"), cfg)
    assert (batch[schema.KEY][0], batch[schema.IMAGE][0], batch[schema.TEXT][0]) == \
        ("u1", b"PX", b"d")
    with pytest.raises(ValueError, match="no image, image path or URL column"):
        read_inputs_local(str(tmp_path / "t.parquet"))
    with pytest.raises(ValueError, match="read.text_column='nope'.*columns"):
        read_inputs_local(str(tmp_path / "t.parquet"), ReadConfig(text_column="nope",
                                                                  image_column="pixels"))
    with pytest.raises(ValueError, match="valid: auto, webdataset, parquet, urls"):
        ReadConfig(format="zip")  # type: ignore[arg-type]


def test_url_lists(tmp_path) -> None:
    (tmp_path / "a.csv").write_text('\ufeffurl,caption\nhttp://h/1.jpg,"a, quoted caption"\n'
                                    "http://h/2.jpg,\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_bytes(b'URL\tTEXT\n http://h/3.jpg \t"odd" quote\xe9\n')
    (tmp_path / "c.jsonl").write_text('{"url": "http://h/4.jpg", "caption": null, "id": 7, '
                                      '"meta": {"w": 2}}\n\n{"url": "http://h/5.jpg"}\n')
    (tmp_path / "d.txt").write_text("http://h/6.jpg\n\n  http://h/7.jpg\n")
    _write_parquet(tmp_path / "e.parquet", {"url": ["http://h/8.jpg"], "caption": ["p"]})
    files = list_inputs(str(tmp_path))
    assert [fmt for _, fmt in files] == ["urls"] * 5
    batch = read_inputs_local(str(tmp_path))
    assert list(batch[schema.URL]) == [f"http://h/{i}.jpg" for i in range(1, 9)]
    assert list(batch[schema.IMAGE]) == [None] * 8
    assert list(batch[schema.TEXT]) == [b"a, quoted caption", b"", b'"odd" quote\xe9', None,
                                        None, None, None, b"p"]
    assert batch[schema.KEY][3] == "7" and batch[schema.KEY][0] == "00000000000"
    assert batch[schema.META][3] == '{"w": 2}'
    assert list(batch[schema.ROW_ID]) == [r for f, n in enumerate([2, 1, 2, 2, 1])
                                          for r in _row_ids(f, n)]


def test_list_inputs_dir_glob_and_errors(tmp_path) -> None:
    for name in ("b.tar", "a.tar", "a.parquet", "_SUCCESS", ".hidden.tar", "notes.md"):
        (tmp_path / name).write_bytes(encode_shard(_samples(1))[0] if name.endswith("tar")
                                      else b"")
    _write_parquet(tmp_path / "c.parquet", {"image": [b"x"]})
    root = str(tmp_path)
    # next to .tar shards, parquet files are their metadata (img2dataset, built-in manifest)
    assert list_inputs(root) == [(f"{root}/a.tar", "webdataset"), (f"{root}/b.tar", "webdataset")]
    assert list_inputs(f"{root}/*.tar") == [(f"{root}/a.tar", "webdataset"),
                                            (f"{root}/b.tar", "webdataset")]
    assert list_inputs(root, ReadConfig(format="parquet"))[-1] == (f"{root}/c.parquet", "parquet")
    with pytest.raises(ValueError, match="unknown input format; valid formats: webdataset"):
        list_inputs(f"{root}/notes.md")
    with pytest.raises(ValueError, match="read.format='webdataset' reads .tar"):
        list_inputs(f"{root}/c.parquet", ReadConfig(format="webdataset"))
    with pytest.raises(FileNotFoundError, match="no input file"):
        list_inputs(f"{root}/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no inputs.*valid formats: webdataset"):
        list_inputs(f"{root}/empty")


def test_every_config_field_is_documented() -> None:
    assert set(field_docs(ReadConfig)) == {f.name for f in dataclasses.fields(ReadConfig)}


def test_s3_reads_match_local(s3_bucket, tmp_path) -> None:
    tar = encode_shard(_samples(4))[0]
    (tmp_path / "0.tar").write_bytes(tar)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(b"X")
    _write_parquet(tmp_path / "1.parquet", {"image_path": ["imgs/x.jpg", "imgs/none.jpg"]})
    fs, base = filesystem(join(s3_bucket, "in"))
    for rel in ("0.tar", "1.parquet", "imgs/x.jpg"):
        fs.pipe_file(f"{base}/{rel}", (tmp_path / rel).read_bytes())
    files = list_inputs(f"{s3_bucket}/in/*")
    assert files == [(f"{s3_bucket}/in/0.tar", "webdataset"), (f"{s3_bucket}/in/1.parquet",
                                                               "parquet")]
    assert list_inputs(f"{s3_bucket}/in/") == files[:1]     # the parquet is the tar's metadata
    remote = read_inputs_local(join(s3_bucket, "in/*"))
    local = read_inputs_local(f"{tmp_path}/*")
    assert list(remote[schema.IMAGE]) == list(local[schema.IMAGE])
    assert list(remote[schema.IMAGE][-2:]) == [b"X", None]
    for col in set(COLUMNS) - {schema.SOURCE, schema.IMAGE}:
        assert list(remote[col]) == list(local[col]), col


def test_ray_read_matches_local(ray_local, tmp_path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.tar").write_bytes(encode_shard(_samples(5, prefix=f"t{i}-"))[0])
    (tmp_path / "3.txt").write_text("http://h/1.jpg\nhttp://h/2.jpg\n")
    (tmp_path / "4.tar").write_bytes(encode_shard(_samples(5))[0][:4000])   # truncated
    expected = read_inputs_local(f"{tmp_path}/*")
    got = read_inputs(f"{tmp_path}/*").take_batch(1000, batch_format="numpy")
    order = np.argsort(got[schema.ROW_ID])
    assert len(order) == len(expected[schema.ROW_ID]) == 3 * 5 + 2 + 1
    for col in COLUMNS:
        assert list(got[col][order]) == list(expected[col]), col


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_curation_counts_rows_the_read_refuses_and_finishes(ray_local, tmp_path) -> None:
    """Keys with ``.`` or ``/`` and a path outside the table's folder are rejected under a
    ``read`` stage; the job used to fail in the shard writer, after all the work, every rerun."""
    words = ["red fox", "blue boat", "green field", "old bridge", "tall tower", "small cat"]
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for i in range(len(words)):
        (data / "imgs" / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp_path / "secret.jpg").write_bytes(_jpeg(99))
    paths = [f"imgs/{i}.jpg" for i in range(len(words))]
    paths[4] = "../secret.jpg"
    _write_parquet(data / "t.parquet", {"key": ["k0", "k.1", "k/2", "k3", "k4", "k5"],
                                        "image_path": paths,
                                        "caption": [f"a photo of a {w} in the sun" for w in words]})
    stats = run(CurateJobConfig(input=str(data / "t.parquet"), output=str(tmp_path / "out"),
                                write=WriteConfig(shard_size=10))).stats
    assert stats["rows_in"] == 6 == stats["rows_out"] + stats["rows_rejected"]
    read = stats["stages"][0]
    assert read["name"] == "read" and read["in"] == 6 and read["kept"] == 3
    assert read["dropped"] == {"invalid_key": 2, "image_path_outside_input": 1}
    kept = sorted(s[schema.KEY] for s in iter_shards(str(tmp_path / "out" / "shards")))
    assert kept == ["k0", "k3", "k5"] and stats["rows_out"] == 3
