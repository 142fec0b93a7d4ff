"""Where the data stages run, and how much memory the stream may hold.

Every Ray Data task and actor of a vlmray plan (read, decode, curate, download, rewrite, embed)
asks for its CPUs plus :attr:`PlacementConfig.resources`; model-bearing stages (CLIP scoring,
embedding, caption/LLM actors) ask for :attr:`PlacementConfig.model_resources` instead. A custom
resource that only some nodes offer keeps the stages there: on a KubeRay cluster a CPU worker
group started with ``resources: '"{\\"data\\": 1}"'`` decodes and curates while the GPU group,
which does not offer ``data``, only trains. Left empty (the default) the stages run anywhere, so
one 2-core laptop still runs everything on one node.

The stream's memory is bounded by settings, never by rows: :func:`apply_budget` gives Ray Data's
streaming executor an object-store budget (``resource_limits.object_store_memory``, which its
backpressure holds the data stages within), a CPU budget and a block size.

    p = PlacementConfig(resources={"data": 0.001}, object_store_bytes=2 << 30)
    apply_budget(p)                                          # before the plan is built
    ds = ds.map_batches(fn, batch_format="numpy", **remote_args(p, 0.5))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vlmray.config.data import DEFAULT_BLOCK_BYTES, PlacementConfig

if TYPE_CHECKING:
    from ray.data import DataContext

def stage_resources(placement: PlacementConfig | None, *, model: bool = False) -> dict[str, float]:
    """The custom resources a data stage requests (model stages fall back to ``resources``)."""
    if placement is None:
        return {}
    return dict((placement.model_resources if model else {}) or placement.resources)


def remote_args(placement: PlacementConfig | None, num_cpus: float, *,
                model: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``map_batches`` / ``read_datasource(ray_remote_args=...)``: the
    stage's CPUs and the placement's custom resources (none when ``placement`` is None)."""
    args: dict[str, Any] = {"num_cpus": num_cpus}
    resources = stage_resources(placement, model=model)
    if resources:
        args["resources"] = resources
    return args


def apply_budget(placement: PlacementConfig | None,
                 ctx: DataContext | None = None) -> DataContext:
    """Sets the object-store and CPU budget and the block size of ``ctx`` (default: the
    current DataContext) from ``placement``; a 0 setting restores Ray Data's default, so
    calling it again with the same placement changes nothing. Call it before building the plan
    (a dataset copies the current context when it is created) and before the trainer is
    constructed (Ray Train takes the current context's limits for its ingest)."""
    import ray.data

    placement = placement or PlacementConfig()
    ctx = ctx if ctx is not None else ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        cpu=placement.cpu_budget or math.inf,
        object_store_memory=placement.object_store_bytes or math.inf)
    ctx.target_max_block_size = placement.target_block_bytes or DEFAULT_BLOCK_BYTES
    return ctx


__all__ = [ "apply_budget", "remote_args", "stage_resources"]
