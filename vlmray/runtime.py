"""Connecting to Ray: the one place a vlmray process starts or joins a cluster.

Every entry point (training, the curation, rewrite and index jobs) calls :func:`init_ray` before
it builds a Ray Data plan. It imports nothing else of vlmray, so any layer's composing code may
call it.
"""

from __future__ import annotations

import os


def init_ray() -> None:
    """Connects to the cluster a job was submitted to (RAY_ADDRESS), or starts a local one
    bound to loopback. Ray Data's per-operator progress bars are turned off: the run prints its
    own ingest summary and per-step progress."""
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
    else:
        ray.init(dashboard_host="127.0.0.1")


__all__ = ["init_ray"]
