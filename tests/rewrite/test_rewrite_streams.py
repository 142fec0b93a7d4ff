"""The rewrite job streams: on a Ray whose object store is capped at 80 MiB, a job over more
image bytes than that finishes with nothing spilled, while holding its input (a plain
``materialize()`` of the same read) has to spill. Measured through Ray's own store statistics.

    pytest tests/rewrite/test_rewrite_streams.py -q
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.config.curation import WriteConfig
from vlmray.config.data import PlacementConfig
from vlmray.config.jobs import RewriteJobConfig
from vlmray.config.rewrite import RewriteConfig
from vlmray.data.curation.readers import read_inputs
from vlmray.data.placement import apply_budget
from vlmray.data.shards import iter_shard
from vlmray.pipelines.rewrite import run

CAP = 80 << 20                                      # Ray's smallest object store is 75 MiB
FILES, PER_FILE, IMAGE_BYTES = 11, 200, 50_000     # 2200 rows, 110 MB of (incompressible) images


@pytest.fixture(scope="module")
def capped_ray() -> Iterator[None]:
    """A local Ray with an 80 MiB object store; the data stages' budget is 32 MiB in 8 MiB
    blocks (what ``placement.object_store_bytes`` / ``target_block_bytes`` set)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")
    ray.init(num_cpus=2, object_store_memory=CAP, include_dashboard=False, _temp_dir=tmp)
    apply_budget(PlacementConfig(object_store_bytes=32 << 20, target_block_bytes=8 << 20))
    try:
        yield
    finally:
        apply_budget(None)                              # Ray Data's defaults again
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("big") / "train"
    root.mkdir()
    rng = np.random.default_rng(0)
    for f in range(FILES):
        keys = [f"{f:03d}{i:04d}" for i in range(PER_FILE)]
        pq.write_table(pa.table({
            "key": keys, "image": [rng.bytes(IMAGE_BYTES) for _ in keys],
            "text": [f"a photo of a red circle next to {i % 7} blue squares" for i in range(
                PER_FILE)],
            "meta": [json.dumps({"label": i % 7}) for i in range(PER_FILE)]}),
            root / f"part-{f:05d}.parquet", compression="none")
    return str(root)


class StoreMonitor:
    """Samples the object store's bytes in use while a job runs; spilled bytes from Ray."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def stats():
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return get_memory_info_reply(state).store_stats

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self.stats().object_store_bytes_used)

    def __enter__(self) -> StoreMonitor:
        self.spilled0 = self.stats().spilled_bytes_total
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.spilled = self.stats().spilled_bytes_total - self.spilled0


def test_the_job_streams_data_larger_than_the_object_store(capped_ray, inputs, tmp_path) -> None:
    out = str(tmp_path / "out")
    job = RewriteJobConfig(input=inputs, output=out, rewrite=RewriteConfig(k=1),
                           write=WriteConfig(shard_size=550, piece_rows=64))
    with StoreMonitor() as job_store:
        stats = run(job)
    print(f"rewrite job: peak object store {job_store.peak / 2**20:.1f} MiB of "
          f"{CAP / 2**20:.0f}, spilled {job_store.spilled} B; "
          f"{FILES * PER_FILE * IMAGE_BYTES / 2**20:.0f} MiB of images; "
          f"{stats['wall_s']} s ({stats['rewrite_s']} s streaming, "
          f"{stats['write_s']} s assembling shards)")
    assert stats["rows_in"] == stats["rows_out"] == FILES * PER_FILE and stats["shards"] == 4
    assert job_store.spilled == 0                          # the job never held the rows
    first = next(iter_shard(str(Path(out, "shards", "part-00003.tar"))))
    row = 3 * 550                                       # shard 3 starts here, in input order
    assert first["key"] == f"{row // PER_FILE:03d}{row % PER_FILE:04d}"
    assert len(first["image"]) == IMAGE_BYTES

    with StoreMonitor() as held:                        # the measurement can see a held dataset
        ds = read_inputs(inputs).materialize()
        assert ds.count() == FILES * PER_FILE
        del ds
    print(f"materialised input: spilled {held.spilled / 2**20:.1f} MiB")
    assert held.spilled > 0
