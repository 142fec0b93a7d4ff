"""Connecting to Ray: the one place a vlmray process starts or joins a cluster.

Every entry point (training, the curation, rewrite and index jobs) calls :func:`init_ray` before
it builds a Ray Data plan. It imports nothing else of vlmray, so any layer's composing code may
call it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray() -> None:
    """Connects to the cluster a job was submitted to (RAY_ADDRESS), or starts a local one
    reachable from this machine only: GCS, raylet, object manager, workers, agents and the
    dashboard all listen on 127.0.0.1. Ray Data's per-operator progress bars are turned off:
    the run prints its own ingest summary and per-step progress."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    with _loopback_only():
        ray.init(dashboard_host=LOOPBACK)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts: make 127.0.0.1 its node IP, so every server binds loopback.

    Ray 2.60 binds its gRPC servers (GCS, raylet, core workers) to 127.0.0.1 only when the node
    IP *is* 127.0.0.1, and otherwise to 0.0.0.0. ``ray.init(_node_ip_address="127.0.0.1")`` does
    not get there: Ray rewrites a loopback node IP into the machine's routable one. What keeps it
    is the switch Ray uses for single-machine clusters on macOS and Windows,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; its value is read when ``ray`` is imported, so the
    already-imported constant is set too, and both are restored once the node is up (the
    processes it started keep the environment they were started with).
    """
    from ray._private import ray_constants  # no public switch for this in Ray 2.60

    saved_env, saved_flag = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


__all__ = ["init_ray"]
