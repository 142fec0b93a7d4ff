"""The curation job on a real local Ray over shards where runs of rows have no ``.json``
sidecar (issue 21: ``Field meta has incompatible types: string vs float``): it finishes, counts
every row, and its rejects carry every reject column. The batchings themselves are tested in
plain Python (tests/data/curation/test_batchings.py).

    python -m pytest -q tests/data/curation/test_sidecars_ray.py
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from tests.data.curation.test_batchings import _shard_set
from vlmray.config.curation import WriteConfig
from vlmray.config.jobs import CurateJobConfig
from vlmray.data.curation.accounting import REJECT_COLUMNS
from vlmray.data.shards import iter_shards
from vlmray.pipelines.curate import run


def test_curation_job_on_shards_with_and_without_sidecars(ray_local, tmp_path: Path) -> None:
    sizes = [70, 70, 60, 40]                          # sidecars: the first shard, and one row
    uri = _shard_set(tmp_path / "in", sizes, lambda s, i: s == 0 or (s == 2 and i == 30),
                     caption=lambda s, i: not (s == 3 and 12 <= i < 24))
    out = str(tmp_path / "out")
    stats = run(CurateJobConfig(input=uri, output=out, write=WriteConfig(shard_size=64))).stats
    assert stats["rows_in"] == sum(sizes)
    assert stats["rows_out"] + stats["rows_rejected"] == sum(sizes)
    assert stats["reject_reasons"]["missing_text"] == 12
    kept = list(iter_shards(str(tmp_path / "out" / "shards")))
    assert len(kept) == stats["rows_out"] > sum(sizes) // 2
    rejects = pq.read_table(tmp_path / "out" / "rejects")
    assert rejects.column_names == list(REJECT_COLUMNS)
    assert rejects.num_rows == stats["rows_rejected"]
