"""Rows cut by a truncated tar are ``truncated_shard`` (issue 21): only the last, cut row, in
read_file and read_rows alike; whole rows before the cut pass on; later stages (curation's text
and image stages, training's decode) keep the read's reason.

    python -m pytest -q tests/data/curation/test_truncation.py
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmray.config.run import DataConfig
from vlmray.data import schema
from vlmray.data.curation.images import ImageStage
from vlmray.data.curation.readers import READ_REASONS, read_file
from vlmray.data.curation.row_ranges import index_file, read_rows
from vlmray.data.curation.text import TextStage
from vlmray.data.curation.truncation import TRUNCATED_SHARD
from vlmray.data.ingest import DecodeStage

ROWS = 5


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _members() -> list[tuple[str, bytes]]:
    out = []
    for i in range(ROWS):
        out += [(f"s{i}.jpg", _jpeg(i)), (f"s{i}.txt", f"a photo of shape {i}".encode()),
                (f"s{i}.json", b'{"label": %d}' % i)]
    return out


def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, tar.getmembers()


def _end(info: tarfile.TarInfo) -> int:
    return info.offset_data + -(-info.size // 512) * 512


def _cut(name: str) -> tuple[bytes, int, str]:
    """(truncated tar bytes, rows read_file returns, the last row's reason) of a named cut."""
    data, infos = _tar(_members())
    at = {m.name: m for m in infos}
    cuts = {  # where the file ends -> (rows, reason of the last row)
        "in_last_image": (at["s4.jpg"].offset_data + 100, 5, TRUNCATED_SHARD),
        "in_last_caption_header": (at["s4.txt"].offset + 100, 5, TRUNCATED_SHARD),
        "after_last_image_no_marker": (_end(at["s4.jpg"]), 5, TRUNCATED_SHARD),
        "in_last_sidecar": (at["s4.json"].offset_data + 3, 5, TRUNCATED_SHARD),
        "between_rows": (at["s3.jpg"].offset + 200, 3, ""),
        "whole_rows_no_marker": (_end(at["s4.json"]), 5, ""),
    }
    end, rows, reason = cuts[name]
    return data[:end], rows, reason


CUTS = ["in_last_image", "in_last_caption_header", "after_last_image_no_marker",
        "in_last_sidecar", "between_rows", "whole_rows_no_marker"]


@pytest.mark.parametrize("cut", CUTS)
def test_only_the_cut_row_is_truncated_shard_in_both_readers(tmp_path: Path, cut: str) -> None:
    data, rows, reason = _cut(cut)
    uri = str(tmp_path / "00000.tar")
    Path(uri).write_bytes(data)
    whole = read_file(uri, 4, "webdataset")
    assert len(whole[schema.KEY]) == rows == index_file(uri, "webdataset", 2).rows
    expected = [""] * (rows - 1) + [reason]
    assert list(whole[schema.REJECT_REASON]) == expected
    assert list(whole[schema.REJECT_STAGE]) == ["read" if r else "" for r in expected]
    assert whole[schema.IMAGE][rows - 1] is None or not reason    # a read reject: no bytes
    assert all(whole[schema.TEXT][i] for i in range(rows - 1))    # whole rows untouched
    for select in ([rows - 1], list(range(rows)), [rows - 1, 0], [1]):
        got = read_rows(uri, 4, "webdataset", np.array(select))
        for c in whole:
            assert list(got[c]) == list(whole[c][select]), (c, select)
    idx = index_file(uri, "webdataset", 2)
    j = len(idx.offsets) - 1
    got = read_rows(uri, 4, "webdataset", np.arange(2 * j, rows), offset=idx.offsets[j],
                    start=2 * j)
    assert list(got[schema.REJECT_REASON]) == expected[2 * j:]


def test_truncated_tar_gz(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).bytes(20_000)        # incompressible: the gzip's tail
    data, _ = _tar(_members()[:-3] + [("s4.txt", b"last"), ("s4.jpg", noise)])
    packed = gzip.compress(data)
    for end, last in ((len(packed) - 3000, TRUNCATED_SHARD), (len(packed), "")):
        uri = str(tmp_path / f"cut{end}.tar.gz")
        Path(uri).write_bytes(packed[:end])
        whole = read_file(uri, 0, "webdataset")
        assert whole[schema.REJECT_REASON][-1] == last, end
        assert list(read_rows(uri, 0, "webdataset", np.array([len(whole[schema.KEY]) - 1]))[
            schema.REJECT_REASON]) == [last]


def test_later_stages_keep_the_reads_reason(tmp_path: Path) -> None:
    assert TRUNCATED_SHARD in READ_REASONS
    data, rows, _ = _cut("in_last_caption_header")
    uri = str(tmp_path / "00000.tar")
    Path(uri).write_bytes(data)
    batch = ImageStage()(TextStage()(read_file(uri, 0, "webdataset")))
    assert list(batch[schema.REJECT_REASON]) == [""] * (rows - 1) + [TRUNCATED_SHARD]
    assert batch[schema.REJECT_STAGE][-1] == "read"
    decoded = DecodeStage(DataConfig())(read_file(uri, 0, "webdataset"))   # training's ingest
    assert list(decoded[schema.REJECT_REASON]) == [""] * (rows - 1) + [TRUNCATED_SHARD]
    assert decoded[schema.REJECT_STAGE][-1] == "read"
