"""What the readers refuse, with a reason, without Ray: keys that cannot name shard members,
tar members grouped by their full path, image paths outside the table's folder or on the
web, and reads capped at ``read.max_bytes`` (files and tar members)."""

from __future__ import annotations

import http.server
import io
import json
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.config.curation import TextConfig
from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.accounting import count_batch, stage_stats
from vlmray.data.curation.readers import read_file, read_inputs_local
from vlmray.data.curation.text import TextStage
from vlmray.data.shards import encode_shard, iter_shard

KEYS = ["ok1", "a.b", "c/d", "ok2"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_table(path: Path, columns: dict[str, list]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path)
    elif path.suffix == ".jsonl":
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = [",".join(columns)] + [",".join(v) for v in zip(*columns.values())]
        path.write_text("\n".join(lines) + "\n")


def _paths(tmp_path: Path, paths: list[str], cfg: ReadConfig | None = None) -> dict:
    """``paths`` in the image_path column of ``tmp_path/data/t.parquet``, read."""
    (tmp_path / "data").mkdir(exist_ok=True)
    _write_table(tmp_path / "data" / "t.parquet", {"image_path": paths})
    return read_file(str(tmp_path / "data" / "t.parquet"), 0, "parquet", cfg)


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_bad_table_keys_are_rejected_at_read_and_counted(tmp_path, ext: str) -> None:
    n = len(KEYS)
    _write_table(tmp_path / f"t{ext}", {"key": KEYS, "caption": [f"a photo of thing {i}"
                                                                 for i in range(n)],
                                        "url": [f"http://h/{i}.jpg" for i in range(n)]})
    batch = read_inputs_local(str(tmp_path / f"t{ext}"))
    assert list(batch[schema.KEY]) == KEYS
    assert list(batch[schema.REJECT_REASON]) == ["", "invalid_key", "invalid_key", ""]
    assert list(batch[schema.REJECT_STAGE]) == ["", "read", "read", ""]
    out = TextStage(TextConfig())(batch)        # later stages pass the read's rejects through
    assert list(out[schema.REJECT_STAGE]) == ["", "read", "read", ""]
    counts = count_batch(out)
    stats = stage_stats(["read", "text"], {(k, s, r): int(c) for k, s, r, c in zip(
        counts["kind"], counts["stage"], counts["name"], counts["n"])}, {})
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"] == n
    assert stats["stages"][0]["dropped"] == {"invalid_key": 2}
    kept = [{schema.KEY: k, schema.TEXT: "x"} for k, r in
            zip(out[schema.KEY], out[schema.REJECT_REASON]) if not r]
    assert encode_shard(kept)[1] == 2           # what is left can be written


def test_tar_members_are_grouped_by_full_path(tmp_path) -> None:
    _tar(tmp_path / "t.tar", [("a/000.jpg", b"A"), ("b/000.txt", b"caption of b"),
                              ("./c/001.jpg", b"C"), ("c/001.txt", b"caption of c"),
                              ("v1.0/002.jpg", b"V")])
    batch = read_file(str(tmp_path / "t.tar"), 0, "webdataset")
    assert list(batch[schema.KEY]) == ["a_000", "b_000", "c_001", "v1_0_002"]
    assert list(batch[schema.IMAGE]) == [b"A", None, b"C", b"V"]
    assert list(batch[schema.TEXT]) == [None, b"caption of b", b"caption of c", None]
    assert list(batch[schema.REJECT_REASON]) == [""] * 4
    shard = [(s[schema.KEY], s[schema.IMAGE], s[schema.TEXT])
             for s in iter_shard(str(tmp_path / "t.tar"))]
    assert shard == [("a_000", b"A", None), ("b_000", None, "caption of b"),
                     ("c_001", b"C", "caption of c"), ("v1_0_002", b"V", None)]


def test_image_paths_stay_in_the_table_folder(tmp_path) -> None:
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "x.jpg").write_bytes(b"X")
    (tmp_path / "secret.jpg").write_bytes(b"SECRET")
    secret = str(tmp_path / "secret.jpg")
    paths = ["imgs/x.jpg", "./imgs/../imgs/x.jpg", "../secret.jpg", "imgs/../../secret.jpg",
             secret, f"file://{secret}", f"simplecache::file://{secret}"]
    batch = _paths(tmp_path, paths)
    outside = "image_path_outside_input"
    assert list(batch[schema.IMAGE]) == [b"X", b"X"] + [None] * 5
    assert list(batch[schema.REJECT_REASON]) == ["", ""] + [outside] * 5
    opted = _paths(tmp_path, paths, ReadConfig(allow_absolute_paths=True))
    assert list(opted[schema.IMAGE]) == [b"X", b"X", None, None, b"SECRET", b"SECRET", None]
    assert list(opted[schema.REJECT_REASON]) == ["", ""] + [outside] * 2 + ["", "", outside]


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    """A local web server and the paths it was asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"FETCHED")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()


@pytest.mark.parametrize("allow", [False, True])
def test_web_urls_in_image_paths_are_never_fetched(tmp_path, http_server, allow: bool) -> None:
    base, asked = http_server
    paths = [f"{base}/a.jpg", f"{base.upper()}/b.jpg", f"simplecache::{base}/c.jpg"]
    batch = _paths(tmp_path, paths, ReadConfig(allow_absolute_paths=True) if allow else None)
    assert list(batch[schema.REJECT_REASON]) == ["url_belongs_in_url_column"] * 3
    assert list(batch[schema.IMAGE]) == [None] * 3 and asked == []


def test_reads_are_capped_and_only_regular_files(tmp_path) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "small.jpg").write_bytes(b"s" * 1000)
    (tmp_path / "data" / "big.jpg").write_bytes(b"b" * 1001)
    t0 = time.perf_counter()
    batch = _paths(tmp_path, ["small.jpg", "big.jpg", "sub", "/dev/zero", "gone.jpg"],
                   ReadConfig(allow_absolute_paths=True, max_bytes=1000))
    assert time.perf_counter() - t0 < 5
    assert list(batch[schema.IMAGE]) == [b"s" * 1000, None, None, None, None]
    assert list(batch[schema.REJECT_REASON]) == ["", "file_too_large", "image_path_not_a_file",
                                                 "image_path_not_a_file", ""]


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as they are read (a huge member without holding it)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def test_oversize_tar_member_is_rejected_before_it_is_read(tmp_path) -> None:
    huge = 48 << 20
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, size, data in [("a.jpg", 3, b"AAA"), ("a.txt", 5, b"first"),
                                 ("b.jpg", huge, None), ("b.txt", 6, b"second"),
                                 ("c.jpg", 3, b"CCC")]:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BufferedReader(_Zeros(size)) if data is None else io.BytesIO(data))
    assert path.stat().st_size < huge // 100                   # small on disk, huge unpacked
    tracemalloc.start()
    try:
        batch = read_file(str(path), 0, "webdataset", ReadConfig(max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < huge // 4
    assert list(batch[schema.KEY]) == ["a", "b", "c"]
    assert list(batch[schema.IMAGE]) == [b"AAA", None, b"CCC"]
    assert list(batch[schema.REJECT_REASON]) == ["", "file_too_large", ""]
    assert list(batch[schema.REJECT_STAGE]) == ["", "read", ""]
    _tar(tmp_path / "plain.tar", [("a.jpg", b"AAA"), ("b.jpg", bytes(2000)), ("b.txt", b"t"),
                                  ("c.jpg", b"CCC")])
    rows = list(iter_shard(str(tmp_path / "plain.tar"), max_member_bytes=1000))
    assert [(r[schema.KEY], r[schema.IMAGE], r[schema.TEXT]) for r in rows] == \
        [("a", b"AAA", None), ("b", None, "t"), ("c", b"CCC", None)]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"max_bytes": 0}, "read.max_bytes must be an integer > 0"),
    ({"max_bytes": 1.5}, "read.max_bytes must be an integer > 0"),
    ({"allow_absolute_paths": "yes"}, "read.allow_absolute_paths must be true or false"),
])
def test_bad_read_settings_fail_early(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ReadConfig(**kwargs)


def test_read_reasons_leave_other_rows_alone(tmp_path) -> None:
    """A parquet with inline bytes, a good key and a bad one: only the bad row changes."""
    pq.write_table(pa.table({"key": ["good", "bad.key"], "image": [b"I1", b"I2"]}),
                   tmp_path / "t.parquet")
    batch = read_inputs_local(str(tmp_path / "t.parquet"))
    assert list(batch[schema.IMAGE]) == [b"I1", None]
    assert batch[schema.ROW_ID].dtype == np.int64
