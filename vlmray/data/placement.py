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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.data import DataContext

_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
MIN_BLOCK_BYTES = 1 << 20
DEFAULT_BLOCK_BYTES = 128 << 20
"""Ray Data's ``DEFAULT_TARGET_MAX_BLOCK_SIZE`` (kept here so configs validate without Ray)."""


@dataclass(kw_only=True)
class PlacementConfig:
    """Custom resources of the data stages and the memory budget of the stream."""

    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources every data task and actor requests besides its CPUs, e.g.
    ``{"data": 0.001}``: the stages then run only on nodes started with that resource (a CPU
    worker group with ``rayStartParams: {resources: '"{\\"data\\": 1}"'}``); empty = any node."""
    model_resources: dict[str, float] = field(default_factory=dict)
    """The same for model-bearing stages (CLIP scoring, embedding, captioning and LLM rewrite
    actors), e.g. ``{"embed": 0.001}`` to put them on their own group; empty = ``resources``."""
    object_store_bytes: int = 0
    """Object-store budget of the data stages (Ray Data's
    ``resource_limits.object_store_memory``): its backpressure pauses reading and decoding
    while the stream's blocks fill it; 0 = Ray Data's default (a share of the object store)."""
    cpu_budget: float = 0.0
    """CPUs the data stages may hold at once (``resource_limits.cpu``), e.g. the data group's
    cores; 0 = Ray Data's default (the cluster's CPUs less what training reserved)."""
    target_block_bytes: int = 0
    """Largest block a data stage emits (``DataContext.target_max_block_size``); the object
    store and each task hold a few such blocks; 0 = Ray Data's default (128 MiB)."""
    read_concurrency: int = 0
    """Input files read at once (each read task holds one file's rows until it has emitted
    them); 0 = as many as the CPUs and the object-store budget allow."""
    prefetch_batches: int = 2
    """Batches each training worker fetches ahead of the one it trains on
    (``iter_torch_batches(prefetch_batches=...)``)."""

    def __post_init__(self) -> None:
        _check_resources("resources", self.resources)
        _check_resources("model_resources", self.model_resources)
        for name in ("object_store_bytes", "target_block_bytes", "read_concurrency",
                     "prefetch_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"placement.{name} must be an int >= 0 (0 = Ray's default), "
                                 f"got {value!r}")
        if (isinstance(self.cpu_budget, bool) or not isinstance(self.cpu_budget, (int, float))
                or not math.isfinite(self.cpu_budget) or self.cpu_budget < 0):
            raise ValueError(f"placement.cpu_budget must be a number >= 0 (0 = Ray's default), "
                             f"got {self.cpu_budget!r}")
        if 0 < self.target_block_bytes < MIN_BLOCK_BYTES:
            raise ValueError(f"placement.target_block_bytes={self.target_block_bytes} is below "
                             f"Ray Data's 1 MiB minimum block; set it >= {MIN_BLOCK_BYTES} or 0")
        block = self.target_block_bytes or DEFAULT_BLOCK_BYTES
        if 0 < self.object_store_bytes < 2 * block:
            raise ValueError(f"placement.object_store_bytes={self.object_store_bytes} holds "
                             f"fewer than 2 blocks of {block} bytes, so the stream could not "
                             f"flow: raise it to >= {2 * block} or lower "
                             f"placement.target_block_bytes")


def _check_resources(name: str, resources: Any) -> None:
    """Custom resource names -> positive finite amounts; CPU/GPU/memory are set per stage."""
    if not isinstance(resources, dict):
        raise TypeError(f"placement.{name} must be a dict of custom resource -> amount, "
                        f'e.g. {{"data": 0.001}}, got {resources!r}')
    for key, amount in resources.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"placement.{name}: resource names are non-empty strings, "
                             f"got {key!r}")
        if key in _RAY_RESOURCES:
            raise ValueError(f"placement.{name}: {key!r} is a Ray resource each stage sets "
                             f"itself; name a custom resource your data nodes offer "
                             f'(e.g. {{"data": 0.001}})')
        if (isinstance(amount, bool) or not isinstance(amount, (int, float))
                or not math.isfinite(amount) or amount <= 0):
            raise ValueError(f"placement.{name}[{key!r}] must be a number > 0 (a fraction such "
                             f"as 0.001 only tags the task), got {amount!r}")


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


__all__ = ["PlacementConfig", "apply_budget", "remote_args", "stage_resources"]
