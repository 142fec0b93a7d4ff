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

from vlmray.data.curation.readers import ARROW_SCHEMA, COLUMNS, ReadConfig, read_file


def read_arrow(uri: str, index: int, fmt: str, cfg: ReadConfig | None) -> Iterator[pa.Table]:
    """One input file -> one Arrow table with the reader's fixed column types."""
    batch = read_file(uri, index, fmt, cfg)
    yield pa.Table.from_pydict({c: list(batch[c]) for c in COLUMNS}, schema=ARROW_SCHEMA)


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
