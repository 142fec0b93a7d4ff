"""A Ray Data datasource over curation inputs: one read task per input file.

A read task's rows then flow through the (fused) per-row stages in the same task, so N input
files give N parallel streams; ``from_items`` + ``map_batches`` would instead let a downstream
stage's batch size bundle all files into one task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from vlmray.config.inputs import ReadConfig
from vlmray.data.curation.readers import ARROW_SCHEMA, COLUMNS, read_file

BLOCK_ROWS = 256
"""Rows per block a read task emits: a file's rows leave its task in blocks of this many, so
what the object store and each downstream task hold is bounded by this, not by the file's
size (a 10,000-row shard decoded at 224 px would be one 6 GB block)."""


def read_arrow(uri: str, index: int, fmt: str, cfg: ReadConfig | None,
               block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """One input file -> Arrow tables of at most ``block_rows`` rows, in row order, with the
    reader's fixed column types."""
    batch = read_file(uri, index, fmt, cfg)
    n = len(batch[COLUMNS[0]])
    for start in range(0, max(n, 1), block_rows):
        yield pa.Table.from_pydict({c: list(batch[c][start:start + block_rows])
                                    for c in COLUMNS}, schema=ARROW_SCHEMA)


class InputFiles(Datasource):
    """The files :func:`~vlmray.data.curation.readers.list_inputs` found, a read task each."""

    def __init__(self, files: Sequence[tuple[str, str]], cfg: ReadConfig | None) -> None:
        self.files, self.cfg = list(files), cfg

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        tasks = []
        for index, (uri, fmt) in enumerate(self.files):
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                 input_files=(uri,))
            tasks.append(ReadTask(lambda u=uri, i=index, f=fmt: read_arrow(u, i, f, self.cfg),
                                  meta, schema=ARROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


__all__ = ["InputFiles", "read_arrow"]
