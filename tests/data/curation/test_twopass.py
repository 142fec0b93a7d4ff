"""Two-pass whole-dataset decisions: the compact table, per-input-file decision files joined by
ROW_ID, the fingerprint cache; plain Python, then pass 1 + the deciding task on a local Ray.

    python -m pytest tests/data/curation/test_twopass.py -q
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.curation import DedupConfig, ScoreConfig
from vlmray.data import schema
from vlmray.data.curation.dedup import Dedup
from vlmray.data.curation.score import TopFraction
from vlmray.data.curation.stage import Decisions
from vlmray.data.curation.twopass import (
    FileDecisions,
    compact_columns,
    decide_all,
    global_decisions,
    read_compact,
    write_decisions,
)


def _ids(file: int, rows: list[int]) -> np.ndarray:
    return (np.int64(file) << 32) | np.asarray(rows, dtype=np.int64)


def _table() -> dict[str, np.ndarray]:
    """Rows of 3 input files; file 2's row 0 repeats file 0's image, file 1's row 1 a key."""
    ids = np.concatenate([_ids(0, [0, 1]), _ids(1, [0, 1]), _ids(2, [0])])
    return {schema.ROW_ID: ids,
            schema.KEY: np.array(["a", "b", "c", "a", "e"], dtype=object),
            schema.SHA256: np.array(["s0", "s1", "s2", "s3", "s0"], dtype=object),
            schema.CLIP_SCORE: np.array([0.9, 0.1, 0.5, 0.7, 0.8])}


def test_decisions_are_sequential_and_written_per_input_file(tmp_path: Path) -> None:
    stages = [Dedup(DedupConfig(near=False, captions=False)),
              TopFraction(ScoreConfig(model="x", keep_top_fraction=0.5))]
    assert compact_columns(stages) == [schema.ROW_ID, schema.KEY, schema.SHA256,
                                       schema.CLIP_SCORE]
    decided = dict(decide_all(_table(), stages))
    dedup, top = decided["dedup"], decided["score_top_fraction"]
    assert dedup.row_ids.tolist() == [_ids(1, [1])[0], _ids(2, [0])[0]]
    assert dedup.duplicate_of.tolist() == ["a", "a"]
    # the top fraction sees only the 3 rows dedup kept: ceil(0.5 * 3) = 2 stay
    assert top.row_ids.tolist() == [_ids(0, [1])[0]]
    root = str(tmp_path / "decisions")
    assert write_decisions(root, "dedup", dedup) == {"duplicate_image": 1, "duplicate_key": 1}
    assert json.loads((tmp_path / "decisions/dedup/_files.json").read_text()) == [1, 2]
    one = pq.read_table(tmp_path / "decisions/dedup/file-00000001.parquet")
    assert one.column(schema.REJECT_REASON).to_pylist() == ["duplicate_key"]


def test_file_decisions_join_by_row_id_and_pickle_light(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_decisions(root, "dedup", Decisions(
        row_ids=np.concatenate([_ids(3, [5]), _ids(9, [0, 2])]),
        reasons=np.array(["duplicate_key", "duplicate_image", "duplicate_image"], dtype=object),
        duplicate_of=np.array(["k0", "k1", "k1"], dtype=object)))
    stage = FileDecisions(root, "dedup")
    stage.CACHE_FILES = 1                                 # every other file evicts the last
    batch = {schema.ROW_ID: np.concatenate([_ids(9, [0, 1, 2]), _ids(3, [5]), _ids(4, [0])]),
             schema.KEY: np.array(list("vwxyz"), dtype=object)}
    out = stage(dict(batch))
    assert out[schema.REJECT_REASON].tolist() == ["duplicate_image", "", "duplicate_image",
                                                  "duplicate_key", ""]
    assert out[schema.REJECT_STAGE].tolist() == ["dedup", "", "dedup", "dedup", ""]
    assert out[schema.DUPLICATE_OF].tolist() == ["k1", "", "k1", "k0", ""]
    assert len(stage._cache) == 1 and 4 not in stage._cache   # file 4 has no decisions file
    shipped = pickle.loads(pickle.dumps(stage))
    assert not shipped._cache and shipped._present is None    # ships its root, not its tables
    assert shipped(dict(batch))[schema.REJECT_REASON].tolist() == out[
        schema.REJECT_REASON].tolist()


def test_read_compact_keeps_live_rows_sorted_and_unifies_null_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({schema.ROW_ID: pa.array([7, 3], pa.int64()),
                             schema.KEY: pa.array(["g", "c"]),
                             schema.REJECT_REASON: pa.array(["", "x"])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({schema.ROW_ID: pa.array([1], pa.int64()),
                             schema.KEY: pa.array([None], pa.null()),
                             schema.REJECT_REASON: pa.array([""])}), tmp_path / "b.parquet")
    table = read_compact(str(tmp_path), [schema.ROW_ID, schema.KEY])
    assert table[schema.ROW_ID].tolist() == [1, 7] and table[schema.KEY].tolist() == [None, "g"]


def test_pass_one_and_the_deciding_task_on_ray_are_cached(ray_local, tmp_path: Path) -> None:
    import ray.data

    table = _table()
    rows = {**{c: v.tolist() for c, v in table.items()},
            schema.REJECT_REASON: ["", "", "", "", ""],
            schema.IMAGE: [b"\x00" * 10] * 5}
    rows[schema.REJECT_REASON][1] = "decode_error"    # rejected in pass 1: not in the table
    calls = []

    def plan():
        calls.append(1)
        return ray.data.from_items([dict(zip(rows, v)) for v in zip(*rows.values())])

    stages = [Dedup(DedupConfig(near=False, captions=False))]
    root = str(tmp_path / "cache")
    first = global_decisions(plan, stages, root, fingerprint="fp1")
    assert first["live_rows"] == 4 and first["rejected"] == {"dedup": {
        "duplicate_image": 1, "duplicate_key": 1}}
    compact = read_compact(first["signatures"], compact_columns(stages))
    assert set(compact) == {schema.ROW_ID, schema.KEY, schema.SHA256}   # no image bytes
    assert global_decisions(plan, stages, root, fingerprint="fp1") == first and len(calls) == 1
    global_decisions(plan, stages, root, fingerprint="fp2")             # settings changed
    assert len(calls) == 2

