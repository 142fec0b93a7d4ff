"""Placement on two Ray nodes: the data stages run where ``data.placement.resources`` is offered,
training where ``train.worker_resources`` is.

A module fixture starts a head offering ``{"trainer_slot": 1}``, 2 CPUs (room for data tasks
that are not pinned) and no ``data`` resource, and a second node offering ``{"data": 1}``
(tests/plugins/ray_head.py, each ``ray start --block`` on 127.0.0.1 in its own session; only
those two nodes are stopped). Then, from Ray's own task records (the state API):

- a train-like actor asking for the trainer slot consumes a streamed plan (vlmray's read +
  curation stages with ``PlacementConfig(resources={"data": 0.001})``): the plan's executor
  runs in that actor on the head, every read and stage task on the data node;
- a short ``vlmray.run`` with ``data.placement.resources`` and ``train.worker_resources``: the
  Ray Train worker on the head, every Ray Data task of the run on the data node.

Without the fixture, unit tests check the settings (bad ones fail naming the fix) and the
budget :func:`~vlmray.data.placement.apply_budget` sets.

    python -m pytest tests/train/test_placement.py -q        # ~4 min on 2 CPU cores
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray

import vlmray
from tests.plugins.ray_head import start_head, start_worker_node, stop_nodes
from tests.train.test_multinode import TINY, _connect, _wait_for_nodes
from vlmray.config import ConfigError
from vlmray.config.curation import CurationConfig
from vlmray.config.data import DEFAULT_BLOCK_BYTES, PlacementConfig, SyntheticConfig
from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.plan import row_stages
from vlmray.data.curation.readers import read_inputs
from vlmray.data.curation.stage import apply_stage
from vlmray.data.placement import apply_budget, remote_args, stage_resources
from vlmray.data.synthetic import ensure_synthetic

NODE = "node_id"
PLACEMENT = PlacementConfig(resources={"data": 0.001}, cpu_budget=1, object_store_bytes=64 << 20,
                            target_block_bytes=8 << 20)
TRAINER = {"trainer_slot": 1}
RUN = {**TINY, "train.num_workers": 1, "train.steps": 4, "train.log_every": 2,
       "train.checkpoint_every": 0, "eval.every": 0, "eval.max_samples": 16,
       "data.synthetic.num_train": 128, "data.synthetic.num_eval": 16,
       "data.synthetic.shard_size": 64, "data.placement.resources": {"data": 0.001},
       "train.torch_threads": 1}
DATA_TASK = ("Read", "MapBatches")   # Ray Data names its tasks after the (fused) operators


# --- settings, without Ray -------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fix", [
    ({"data.placement.resources": '{"CPU": 1}'}, "name a custom resource"),
    ({"data.placement.resources": '{"data": 0}'}, "must be a number > 0"),
    ({"data.placement.model_resources": '["data"]'}, 'e.g. {"data": 0.001}'),
    ({"data.placement.object_store_bytes": "1000"}, "raise it to >= 268435456"),
    ({"data.placement.target_block_bytes": "100"}, "set it >= 1048576 or 0"),
    ({"data.placement.cpu_budget": "-1"}, "must be a number >= 0"),
    ({"data.placement.prefetch_batches": "-2"}, "must be an int >= 0"),
])
def test_bad_placement_fails_naming_the_fix(overrides: dict[str, str], fix: str) -> None:
    with pytest.raises(ConfigError, match="placement") as e:
        vlmray.recipe("clip_tiny", **overrides)
    assert fix in str(e.value)


def test_remote_args_and_budget() -> None:
    import ray.data
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    assert DEFAULT_BLOCK_BYTES == DEFAULT_TARGET_MAX_BLOCK_SIZE
    p = PlacementConfig(resources={"data": 0.001}, model_resources={"embed": 0.5})
    assert remote_args(None, 0.25) == {"num_cpus": 0.25}
    assert remote_args(p, 0.5) == {"num_cpus": 0.5, "resources": {"data": 0.001}}
    assert remote_args(p, 1, model=True) == {"num_cpus": 1, "resources": {"embed": 0.5}}
    assert stage_resources(PlacementConfig(resources={"data": 1}), model=True) == {"data": 1}

    ctx = ray.data.DataContext.get_current().copy()
    for _ in range(2):   # idempotent
        apply_budget(PLACEMENT, ctx)
        limits = ctx.execution_options.resource_limits
        assert (limits.cpu, limits.object_store_memory) == (1, 64 << 20)
        assert ctx.target_max_block_size == 8 << 20
    apply_budget(PlacementConfig(), ctx)   # zeros give Ray Data its defaults back
    assert ctx.execution_options.is_resource_limits_default()
    assert ctx.target_max_block_size == DEFAULT_TARGET_MAX_BLOCK_SIZE


# --- the cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    head: str       # node id of the head: trainer_slot, no data
    data: str       # node id of the data node
    dashboard: str  # the head's dashboard, which answers the state API


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    ray.shutdown()  # this module's connection only
    head = start_head(num_cpus=2, resources=TRAINER, dashboard=True, object_store_mb=150,
                      repo_on_path=True)
    nodes = []
    try:
        _connect(head)
        nodes.append(start_worker_node(head, num_cpus=1, resources={"data": 1},
                                       object_store_mb=150))
        alive = _wait_for_nodes(2, nodes)
        by_resource = {k: n["NodeID"] for n in alive for k in n["Resources"]
                       if k in ("data", "trainer_slot")}
        yield Cluster(head=by_resource["trainer_slot"], data=by_resource["data"],
                      dashboard=head.dashboard)
    finally:
        ray.shutdown()
        stop_nodes(head, *nodes)


def _with_node(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Compact per-row record: row id, reject reason and the node this task ran on."""
    node = ray.get_runtime_context().get_node_id()
    return {schema.ROW_ID: batch[schema.ROW_ID], schema.REJECT_REASON: batch[schema.REJECT_REASON],
            NODE: np.full(len(batch[schema.ROW_ID]), node, dtype=object)}


@ray.remote(num_cpus=0.5, resources=TRAINER)
class TrainLike:
    """Stands in for a Ray Train worker: consumes a stream and says where it ran."""

    def consume(self, ds: ray.data.Dataset) -> dict:
        row_ids, reasons, nodes = [], [], set()
        for batch in ds.iter_batches(batch_format="numpy", batch_size=64, prefetch_batches=1):
            row_ids.append(batch[schema.ROW_ID])
            reasons += [str(r) for r in batch[schema.REJECT_REASON]]
            nodes.update(batch[NODE])
        return {"node": ray.get_runtime_context().get_node_id(), "row_ids": np.concatenate(row_ids),
                "reasons": reasons, "task_nodes": sorted(nodes)}


def _data_tasks(cluster: Cluster) -> list:
    """Ray's records of this job's Ray Data tasks (name, node, resources)."""
    from ray.util.state import list_tasks

    job_id = ray.get_runtime_context().get_job_id()
    tasks = list_tasks(cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True,
                       limit=10_000, raise_on_missing_output=False)
    return [t for t in tasks if t.name.startswith(DATA_TASK)]


def test_curation_stream_runs_on_the_data_node(two_nodes: Cluster, tmp_path: Path) -> None:
    root = ensure_synthetic(SyntheticConfig(num_train=120, num_eval=8, image_size=32,
                                            shard_size=30, seed=5), str(tmp_path / "raw"))
    ds = read_inputs(f"{root}/train", ReadConfig(), PLACEMENT)
    assert ds.context.execution_options.resource_limits.object_store_memory == 64 << 20
    stages = row_stages(CurationConfig())
    for stage in stages:
        ds = apply_stage(ds, stage, PLACEMENT)
    ds = ds.map_batches(_with_node, batch_format="numpy", **remote_args(PLACEMENT, 0.25))

    trainer = TrainLike.remote()
    got = ray.get(trainer.consume.remote(ds), timeout=300)
    assert got["node"] == two_nodes.head
    assert got["task_nodes"] == [two_nodes.data]

    row_ids = got["row_ids"]   # every input row once: 4 files x 30 rows
    assert len(row_ids) == 120 and len(np.unique(row_ids)) == 120
    assert sorted(set(row_ids >> 32)) == [0, 1, 2, 3]
    rejected = sum(1 for r in got["reasons"] if r)
    assert 0 < rejected < 120, "the synthetic noise should reject some rows, not all"

    tasks = _data_tasks(two_nodes)
    names = " ".join(t.name for t in tasks)
    for part in ("ReadInputFiles", *(type(s).__name__ for s in stages), "_with_node"):
        assert part in names, f"no task of {part} among {sorted({t.name for t in tasks})}"
    where = {(t.name, t.node_id) for t in tasks if t.node_id != two_nodes.data}
    assert not where, f"data tasks off the data node: {where}"
    assert all(t.required_resources.get("data") == pytest.approx(0.001) for t in tasks), \
        {t.name: t.required_resources for t in tasks}


def test_run_trains_on_the_head_and_reads_on_the_data_node(two_nodes: Cluster,
                                                           tmp_path: Path) -> None:
    """A short ``vlmray.run``: the Ray Train worker asks for the head's trainer slot
    (``train.worker_resources``), every Ray Data task of the run for ``data``."""
    from ray.util.state import list_actors

    result = vlmray.run(vlmray.recipe("clip_tiny", **RUN), output=str(tmp_path / "run"))
    assert result.metrics["steps"] == 4

    job_id = ray.get_runtime_context().get_job_id()
    workers = list_actors(two_nodes.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, limit=100, raise_on_missing_output=False)
    assert [w.node_id for w in workers if w.job_id == job_id] == [two_nodes.head]
    tasks = _data_tasks(two_nodes)
    print(f"\nRay Data tasks of the job: {sorted({t.name for t in tasks})}")
    assert any("DecodeStage" in t.name for t in tasks), sorted({t.name for t in tasks})
    # a task Ray Data cancelled before it was scheduled (a peek's read ahead) ran nowhere
    where = {(t.name, t.node_id) for t in tasks if t.node_id not in (two_nodes.data, None)}
    assert not where, f"data tasks of the run off the data node: {where}"
    assert any(t.node_id == two_nodes.data for t in tasks if t.name.startswith("Read"))
    assert all(t.required_resources.get("data") == pytest.approx(0.001) for t in tasks), \
        {t.name: t.required_resources for t in tasks}
