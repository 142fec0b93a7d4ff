"""A crashed curation resumes (issue 21): the staging point is reused only when it is complete
and valid (every recorded file there, same sizes and rows, readable, one type per column),
else it is rebuilt, never crashed on. Plain Python: the staged "dataset" writes parquet itself.

    python -m pytest -q tests/data/curation/test_staging.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.data import schema
from vlmray.data.curation.staging import check, describe
from vlmray.data.curation.twopass import DONE, stage_once


class Rows:
    """Stands in for a Ray dataset: ``write_parquet`` writes these blocks, a file each."""

    def __init__(self, blocks: list[pa.Table]) -> None:
        self.blocks = blocks

    def write_parquet(self, path: str, filesystem: object = None) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        for i, block in enumerate(self.blocks):
            pq.write_table(block, f"{path}/block-{i:03d}.parquet")


def _block(meta: list[str | None], start: int = 0) -> pa.Table:
    return pa.table({schema.ROW_ID: pa.array(range(start, start + len(meta)), pa.int64()),
                     schema.META: pa.array(meta, pa.string()),
                     schema.REJECT_REASON: pa.array([""] * len(meta))})


BLOCKS = [_block(['{"a": 1}', None]), _block([None, None, None], 2), _block(["{}"], 5)]


class Stager:
    def __init__(self, tmp: Path) -> None:
        self.uri, self.calls = str(tmp / "_staging"), 0

    def __call__(self, fingerprint: str = "fp") -> str:
        def rows() -> Rows:
            self.calls += 1
            return Rows(BLOCKS)
        return stage_once(rows, self.uri, fingerprint=fingerprint)

    def file(self, i: int) -> Path:
        return Path(self.uri) / "rows" / f"block-{i:03d}.parquet"

    @property
    def done(self) -> Path:
        return Path(self.uri) / DONE


def test_a_complete_staging_is_reused(tmp_path: Path) -> None:
    stage = Stager(tmp_path)
    rows = stage()
    record = json.loads(stage.done.read_text())
    assert record["num_rows"] == 6 and len(record["files"]) == 3 and check(record, rows) == ""
    assert stage() == rows and stage.calls == 1
    stage("other settings")
    assert stage.calls == 2


BREAKS = {
    "file_lost": lambda s: s.file(1).unlink(),
    "file_truncated": lambda s: s.file(0).write_bytes(s.file(0).read_bytes()[:-40]),
    "file_replaced": lambda s: pq.write_table(_block(["x"] * 9), s.file(2)),
    "stray_file": lambda s: pq.write_table(_block(["x"]), s.file(7)),
    "rows_folder_gone": lambda s: [p.unlink() for p in s.file(0).parent.iterdir()],
    "success_unreadable": lambda s: s.done.write_text('{"fingerprint": "fp", "fi'),
    "success_of_an_older_version": lambda s: s.done.write_text(
        json.dumps({"fingerprint": "fp", "rows": str(s.file(0).parent)})),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_an_incomplete_or_unreadable_staging_is_rebuilt(tmp_path: Path, how: str) -> None:
    stage = Stager(tmp_path)
    stage()
    BREAKS[how](stage)
    rows = stage()                                   # no crash: staged again
    assert stage.calls == 2
    assert check(json.loads(stage.done.read_text()), rows) == ""
    assert pq.read_table(rows).num_rows == 6
    assert stage() == rows and stage.calls == 2      # and then reused


def test_a_staging_poisoned_by_mixed_types_is_rebuilt(tmp_path: Path) -> None:
    """What the issue's crash left behind: meta string in one file, float (NaN) in another,
    under a _SUCCESS that matches them; the re-run rebuilt it instead of crashing again."""
    stage = Stager(tmp_path)
    stage()
    poisoned = pa.table({schema.ROW_ID: pa.array([2, 3, 4], pa.int64()),
                         schema.META: pa.array([None, None, None], pa.float32()),
                         schema.REJECT_REASON: pa.array(["", "", ""])})
    pq.write_table(poisoned, stage.file(1))
    record = json.loads(stage.done.read_text())
    record["files"]["block-001.parquet"] = [stage.file(1).stat().st_size, 3]
    stage.done.write_text(json.dumps(record))
    assert "meta" in check(record, str(stage.file(1).parent))
    with pytest.raises(ValueError, match="not valid"):
        describe(str(stage.file(1).parent))
    rows = stage()
    assert stage.calls == 2
    assert pq.read_schema(Path(rows) / "block-001.parquet").field(schema.META).type == pa.string()
