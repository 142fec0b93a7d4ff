"""A FAISS index built from many shards of embeddings in parallel Ray tasks.

    shards = [(vectors_0, keys_0), (vectors_1, keys_1), ...]      # (n_i, D) float32, n_i keys
    built = build_sharded(shards, IndexConfig(kind="ivf_flat"), parallel=8)
    built.save("s3://bucket/index/image")

The quantizer is trained once, in this process, on a seeded sample drawn across all shards (the
same rows :func:`~vlmray.retrieval.index.build_index` would draw from the concatenated shards).
The trained empty index goes into the object store once; each shard is added to a copy of it in
its own Ray task, and the filled copies are merged here in shard order, so row ``i`` of the
result is row ``i`` of the concatenated shards and the index equals a single-process build.
HNSW cannot be merged: its shards are added one after another in this process. Tuning
(``nprobe``/``efSearch``) and the recall@10 report are exactly those of ``build_index``, with the
exact neighbours found shard by shard. GPUs (when ``faiss.get_num_gpus() > 0``) train and
search; filling runs on CPU copies.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import faiss
import numpy as np

from vlmray.retrieval.index import (
    ADD_CHUNK,
    TUNE_K,
    BuiltIndex,
    IndexConfig,
    _f32,
    _holdout_queries,
    _prepare,
    _serialize,
    _to_device,
    _train,
    _tune_and_report,
    choose_kind,
    exact_topk,
)

__all__ = ["build_sharded", "fill_shard", "merge_filled"]

Shard = tuple[np.ndarray, Sequence[str]]


def build_sharded(shards: list[Shard], cfg: IndexConfig, *, parallel: int = 0,
                  queries_holdout: int = 1000) -> BuiltIndex:
    """One tuned index over the concatenation of ``shards``, filled ``parallel`` shards at a
    time in Ray tasks (0, or Ray not initialised: in this process)."""
    shards = [(_f32(v), np.asarray(list(k), dtype=object)) for v, k in shards if len(k)]
    for vectors, keys in shards:
        if len(keys) != len(vectors):
            raise ValueError(f"shard has {len(keys)} keys for {len(vectors)} vectors")
    if not shards:
        raise ValueError("cannot build an index over 0 vectors")
    dims = {v.shape[1] for v, _ in shards}
    if len(dims) != 1:
        raise ValueError(f"shards have different dimensions: {sorted(dims)}")
    t0 = time.perf_counter()
    offsets = np.cumsum([0] + [len(v) for v, _ in shards])       # (S + 1,)
    n, dim = int(offsets[-1]), dims.pop()

    def take(ids: np.ndarray) -> np.ndarray:
        return _gather(shards, offsets, ids)

    kind = choose_kind(n, dim, cfg)
    rng = np.random.default_rng(cfg.seed)
    trained, params = _train(kind, n, dim, take, cfg, rng)
    built = BuiltIndex(index=trained, keys=np.concatenate([k for _, k in shards]), cfg=cfg)
    if kind == "hnsw":                                          # no merge: add in order here
        for vectors, _ in shards:
            _add(trained, vectors, cfg.metric)
    else:
        blob = np.frombuffer(_serialize(trained), dtype=np.uint8)
        del trained
        parts = _filled(blob, [v for v, _ in shards], cfg.metric, parallel)
        built.index = _to_device(merge_filled(parts), kind)
    queries = _holdout_queries(take, n, queries_holdout, rng, cfg.metric)
    exact = None if kind == "flat" else _exact_ids(shards, queries, cfg)
    _tune_and_report(built, kind, params, queries, exact, t0)
    built.report.update(shards=len(shards), parallel=parallel if _use_ray(parallel) else 0)
    return built


def fill_shard(blob: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """A serialized trained empty index (uint8 array) with ``vectors`` added, serialized."""
    index = faiss.deserialize_index(blob)
    _add(index, vectors, metric)
    return faiss.serialize_index(index)


def merge_filled(parts: Iterator[np.ndarray]) -> Any:
    """Serialized copies of one trained index, each filled with a shard, merged in order into
    the first one: ids of part ``j`` follow those of parts ``< j``. CPU index."""
    merged = None
    for blob in parts:
        part = faiss.deserialize_index(blob)
        if merged is None:
            merged = part
        elif isinstance(merged, faiss.IndexIVF):
            merged.merge_from(part, merged.ntotal)      # shift the part's ids past ours
        else:                                           # flat: ids are positions
            merged.merge_from(part)
    if merged is None:
        raise ValueError("nothing to merge")
    return merged


# --- helpers ------------------------------------------------------------------------------------

def _use_ray(parallel: int) -> bool:
    if parallel <= 0:
        return False
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _filled(blob: np.ndarray, shards: list[np.ndarray], metric: str,
            parallel: int) -> Iterator[np.ndarray]:
    """Each shard added to a copy of ``blob``, in shard order; at most ``parallel`` Ray tasks
    in flight (the trained index is put in the object store once)."""
    if not _use_ray(parallel):
        for vectors in shards:
            yield fill_shard(blob, vectors, metric)
        return
    import ray

    task = ray.remote(num_cpus=1)(fill_shard)
    ref = ray.put(blob)
    pending: deque[Any] = deque()
    for vectors in shards:
        if len(pending) >= parallel:
            yield ray.get(pending.popleft())
        pending.append(task.remote(ref, vectors, metric))
    while pending:
        yield ray.get(pending.popleft())


def _add(index: Any, vectors: np.ndarray, metric: str) -> None:
    for lo in range(0, len(vectors), ADD_CHUNK):
        index.add(_prepare(vectors[lo:lo + ADD_CHUNK], metric))  # type: ignore[arg-type]


def _gather(shards: list[Shard], offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (positions in the concatenated shards) in the order given, (len(ids), D)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((len(ids), shards[0][0].shape[1]), dtype=np.float32)
    which = np.searchsorted(offsets, ids, side="right") - 1
    for s in np.unique(which):
        hit = which == s
        out[hit] = shards[s][0][ids[hit] - offsets[s]]
    return out


def _exact_ids(shards: list[Shard], queries: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    """True top-``TUNE_K`` ids over all shards: per-shard brute force, merged. (Q, TUNE_K)"""
    scores, ids, base = [], [], 0
    for vectors, _ in shards:
        s, i = exact_topk(_prepare(vectors, cfg.metric), queries, TUNE_K, cfg.metric)
        scores.append(s)
        ids.append(np.where(i >= 0, i + base, -1))
        base += len(vectors)
    s, i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)   # (Q, S * k)
    s = np.where(i >= 0, s, np.inf if cfg.metric == "l2" else -np.inf)
    order = np.argsort(-s if cfg.metric == "ip" else s, axis=1, kind="stable")[:, :TUNE_K]
    return np.take_along_axis(i, order, axis=1)
