"""FAISS nearest-neighbour indexes over embeddings: choose, build, auto-tune, search, save, load.

    cfg = IndexConfig(memory_budget_mb=4096)
    built = build_index(vectors, keys, cfg)           # vectors: (N, D) float32, keys: N strings
    scores, hits = built.search(queries, k=10)        # (Q, k) float32, (Q, k) keys ("" = none)
    built.save("s3://bucket/index/v1"); built = BuiltIndex.load("s3://bucket/index/v1")

The index kind follows autofaiss' rule (:func:`choose_kind`), the search knob (IVF ``nprobe``,
HNSW ``efSearch``) is doubled at build time until recall@10 against exact search on held-out
queries reaches ``target_recall``, and the result's ``report`` says what was reached. GPUs are
used through ``faiss.index_cpu_to_all_gpus`` when present; otherwise the same code runs on CPU.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.retrieval import IndexConfig, Metric
from vlmray.data.storage import filesystem, join, write_bytes_atomic

__all__ = ["IndexConfig", "BuiltIndex", "choose_kind", "build_index", "add_shards", "exact_topk",
           "recall_at_k"]

FLAT_MAX_N = 50_000
"""Below this many vectors (and within the memory budget) ``auto`` picks exact search."""
ADD_CHUNK = 100_000
"""Vectors added to the index per call, so normalised copies stay small."""
TUNE_K = 10
"""Neighbours per held-out query when tuning and reporting recall."""
_MIN_POINTS_PER_CENTROID = 39  # faiss' k-means warns below this
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_FILES = ("index.faiss", "keys.parquet", "report.json")



def choose_kind(n: int, dim: int, cfg: IndexConfig) -> str:
    """The index kind for ``n`` vectors of ``dim`` floats (autofaiss' rule).

    An explicit ``cfg.kind`` is returned as is. For ``auto``, with ``raw = n * dim * 4`` bytes:
    ``flat`` (exact) if ``n < FLAT_MAX_N`` and ``raw`` fits ``memory_budget_mb``; else
    ``ivf_flat`` if ``raw`` fits (exact distances, only the cells searched are approximate);
    else ``ivf_pq``, whose codes take about dim/4 bytes per vector. HNSW is never chosen
    automatically: it needs the raw vectors plus a graph and cannot be trained on a sample.
    """
    if cfg.kind != "auto":
        return cfg.kind
    raw_mb = n * dim * 4 / 2**20
    if raw_mb > cfg.memory_budget_mb:
        return "ivf_pq"
    return "flat" if n < FLAT_MAX_N else "ivf_flat"


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int,
               metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k``: ``(scores (Q, k), ids (Q, k))``; ids are -1 past ``len(base)``.

    Vectors are used as given (normalise them first for cosine). No index copy of ``base``.
    """
    return faiss.knn(_f32(queries), _f32(base), k, metric=_METRICS[metric])


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of ``|approx ∩ exact| / |exact|`` (ids ``-1`` are ignored). Shapes
    ``(Q, k)`` each."""
    valid = exact_ids >= 0
    hit = (approx_ids[:, :, None] == exact_ids[:, None, :]).any(axis=1) & valid  # (Q, k)
    return float(hit.sum() / max(int(valid.sum()), 1))


@dataclass
class BuiltIndex:
    """A faiss index with the key of each row, its config and its build report."""

    index: Any
    keys: np.ndarray
    cfg: IndexConfig
    report: dict[str, Any] = field(default_factory=dict)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores (Q, k) float32, keys (Q, k) object)`` for ``queries (Q, D)``.

        Best first: higher inner product, or smaller squared L2. Slots with no result
        (``k`` > N) hold key ``""`` and score ``-inf`` (ip) / ``+inf`` (l2).
        """
        scores, ids = self.index.search(_prepare(queries, self.cfg.metric), k)
        missing = ids < 0
        keys = np.where(missing, "", self.keys[np.where(missing, 0, ids)]).astype(object)
        scores = np.where(missing, -np.inf if self.cfg.metric == "ip" else np.inf, scores)
        return scores.astype(np.float32), keys

    def save(self, uri: str) -> None:
        """Write ``index.faiss``, ``keys.parquet`` and (last) ``report.json`` under ``uri``."""
        write_bytes_atomic(join(uri, "index.faiss"), _serialize(self.index))
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": pa.array(self.keys.tolist(), pa.string())}), buf)
        write_bytes_atomic(join(uri, "keys.parquet"), buf.getvalue())
        meta = {"config": asdict(self.cfg), "report": self.report}
        write_bytes_atomic(join(uri, "report.json"), json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, uri: str) -> BuiltIndex:
        """Read what :meth:`save` wrote (local path or s3://); moved to GPUs if any."""
        blobs = {}
        for name in _FILES:
            fs, path = filesystem(join(uri, name))
            with fs.open(path, "rb") as f:
                blobs[name] = f.read()
        index = faiss.deserialize_index(np.frombuffer(blobs["index.faiss"], dtype=np.uint8))
        keys = pq.read_table(io.BytesIO(blobs["keys.parquet"])).column("key").to_pylist()
        meta = json.loads(blobs["report.json"])
        report = meta["report"]
        index = _to_device(index, report["kind"])
        for name in ("nprobe", "efSearch"):
            if report.get(name):
                _set_param(index, name, report[name])
        return cls(index=index, keys=np.array(keys, dtype=object),
                   cfg=IndexConfig(**meta["config"]), report=report)


def build_index(vectors: np.ndarray, keys: Sequence[str], cfg: IndexConfig, *,
                queries_holdout: int = 1000) -> BuiltIndex:
    """Build, fill and auto-tune an index over ``vectors (N, D)`` whose rows are ``keys``.

    Trains on a seeded sample of ``cfg.train_sample`` rows, adds in chunks of ``ADD_CHUNK``,
    then tunes ``nprobe``/``efSearch`` on ``queries_holdout`` noisy copies of data rows.
    """
    vectors = _f32(vectors)
    n, dim = vectors.shape
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} vectors")
    if n == 0:
        raise ValueError("cannot build an index over 0 vectors")
    t0 = time.perf_counter()
    kind = choose_kind(n, dim, cfg)
    rng = np.random.default_rng(cfg.seed)
    index, params = _train(kind, n, dim, vectors.__getitem__, cfg, rng)
    built = BuiltIndex(index=index, keys=np.empty(0, dtype=object), cfg=cfg)
    add_shards(built, [(vectors, keys)])
    queries = _holdout_queries(vectors.__getitem__, n, queries_holdout, rng, cfg.metric)
    exact = None
    if kind != "flat":
        exact = exact_topk(_prepare(vectors, cfg.metric), queries, TUNE_K, cfg.metric)[1]
    return _tune_and_report(built, kind, params, queries, exact, t0)


def add_shards(built: BuiltIndex,
               shards: Iterable[tuple[np.ndarray, Sequence[str]]]) -> BuiltIndex:
    """Append ``(vectors (n_i, D), keys)`` shards to a trained index, ``ADD_CHUNK`` rows at a
    time (normalised for ``ip``). Tuning from :func:`build_index` is kept, not redone."""
    new_keys = [built.keys]
    for vectors, keys in shards:
        if len(keys) != len(vectors):
            raise ValueError(f"shard has {len(keys)} keys for {len(vectors)} vectors")
        for lo in range(0, len(vectors), ADD_CHUNK):
            built.index.add(_prepare(vectors[lo:lo + ADD_CHUNK], built.cfg.metric))
        new_keys.append(np.asarray(list(keys), dtype=object))
    built.keys = np.concatenate(new_keys).astype(object)
    if built.report:
        built.report["n"] = int(built.index.ntotal)
    return built


# --- helpers ------------------------------------------------------------------------------------

def _f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {x.shape}")
    return x


def _prepare(x: np.ndarray, metric: Metric) -> np.ndarray:
    """A float32 contiguous copy, L2-normalised for ``ip``."""
    x = np.array(x, dtype=np.float32, order="C", copy=True, ndmin=2)
    if metric == "ip":
        faiss.normalize_L2(x)
    return x


def _auto_nlist(n: int, n_train: int) -> int:
    return max(1, min(int(round(4 * math.sqrt(n))), n_train // _MIN_POINTS_PER_CENTROID))


def _auto_pq_m(dim: int) -> int:
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _factory(kind: str, n: int, dim: int, n_train: int,
             cfg: IndexConfig) -> tuple[Any, dict[str, int]]:
    """``(cpu_index, params)`` from a faiss factory string for ``kind``."""
    params: dict[str, int] = {}
    if kind == "flat":
        spec = "Flat"
    elif kind == "hnsw":
        spec, params["hnsw_m"] = f"HNSW{cfg.hnsw_m},Flat", cfg.hnsw_m
    else:
        nlist = cfg.nlist or _auto_nlist(n, n_train)
        if nlist > n_train:
            raise ValueError(f"nlist={nlist} needs at least that many training vectors, "
                             f"got {n_train}")
        spec, params["nlist"] = f"IVF{nlist},Flat", nlist
        if kind == "ivf_pq":
            m = cfg.pq_m or _auto_pq_m(dim)
            if dim % m or n_train < 256:
                raise ValueError(f"ivf_pq needs pq_m dividing dim={dim} (got {m}) and >= 256 "
                                 f"training vectors (got {n_train})")
            spec, params["pq_m"] = f"IVF{nlist},PQ{m}x8np", m  # np: no polysemous training
    return faiss.index_factory(dim, spec, _METRICS[cfg.metric]), params


def _to_device(index: Any, kind: str) -> Any:
    """The index on all GPUs when there are any (HNSW stays on CPU), else unchanged."""
    if faiss.get_num_gpus() == 0 or kind == "hnsw":
        return index
    return faiss.index_cpu_to_all_gpus(index)


def _serialize(index: Any) -> bytes:
    if faiss.get_num_gpus() > 0 and not isinstance(index, faiss.IndexHNSW):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def _set_param(index: Any, name: str, value: int) -> None:
    space = faiss.GpuParameterSpace() if faiss.get_num_gpus() > 0 else faiss.ParameterSpace()
    space.set_index_parameter(index, name, int(value))


def _holdout_queries(take: Callable[[np.ndarray], np.ndarray], n: int, count: int,
                     rng: np.random.Generator, metric: Metric) -> np.ndarray:
    """``count`` seeded data rows (``take(ids)`` returns rows by position) plus Gaussian noise
    of ~5% of their norm, prepared."""
    rows = take(rng.choice(n, size=min(count, n), replace=False))
    scale = 0.05 * np.linalg.norm(rows, axis=1, keepdims=True) / math.sqrt(rows.shape[1])
    noise = rng.standard_normal(rows.shape, dtype=np.float32) * scale
    return _prepare(rows + noise, metric)


def _train(kind: str, n: int, dim: int, take: Callable[[np.ndarray], np.ndarray],
           cfg: IndexConfig, rng: np.random.Generator) -> tuple[Any, dict[str, int]]:
    """An empty index of ``kind`` (on the GPUs if any), trained on a seeded sample of
    ``cfg.train_sample`` of the ``n`` rows (``take(sorted ids)`` returns them)."""
    sample = _prepare(take(np.sort(rng.permutation(n)[:min(cfg.train_sample, n)])), cfg.metric)
    cpu_index, params = _factory(kind, n, dim, len(sample), cfg)
    index = _to_device(cpu_index, kind)
    index.train(sample)
    return index, params


def _tune_and_report(built: BuiltIndex, kind: str, params: dict[str, int], queries: np.ndarray,
                     exact: np.ndarray | None, t0: float) -> BuiltIndex:
    """Tunes ``built`` against ``exact`` top-``TUNE_K`` ids (None for flat) and fills its
    report."""
    cfg = built.cfg
    tuned, recall = _tune(built.index, kind, exact, queries, cfg, params)
    built.report = {"kind": kind, "metric": cfg.metric, "n": int(built.index.ntotal),
                    "dim": int(built.index.d), **params, **tuned,
                    "build_s": round(time.perf_counter() - t0, 3), "recall_at_10": recall,
                    "target_recall": cfg.target_recall,
                    "target_reached": recall >= cfg.target_recall,
                    "bytes": len(_serialize(built.index)), "gpus": faiss.get_num_gpus()}
    return built


def _tune(index: Any, kind: str, exact: np.ndarray | None, queries: np.ndarray,
          cfg: IndexConfig, params: dict[str, int]) -> tuple[dict[str, int], float]:
    """Double ``nprobe`` (IVF) or ``efSearch`` (HNSW) until recall@k reaches the target.

    "Reaches" means the mean recall minus two standard errors over the held-out queries, so
    fresh queries meet the target too. Returns the setting and its mean recall; stops early
    when two doublings in a row gain < 0.001 recall (PQ's compressed distances cap it).
    Flat is exact: ``({}, 1.0)`` without a search. ``exact``: the true top-``TUNE_K`` ids.
    """
    if kind == "flat" or exact is None:
        return {}, 1.0
    if kind == "hnsw":
        name, ladder = "efSearch", [16 << i for i in range(9)]  # 16 .. 4096
    else:
        nlist = params["nlist"]
        name = "nprobe"
        ladder = [cfg.nprobe] if cfg.nprobe else _doublings(nlist)
    gains, recall, value = [], 0.0, ladder[0]
    for value in ladder:
        _set_param(index, name, value)
        approx = index.search(queries, TUNE_K)[1]
        previous, recall = recall, recall_at_k(approx, exact)
        gains.append(recall - previous)
        if _recall_lower_bound(approx, exact) >= cfg.target_recall:
            break
        if len(gains) > 2 and max(gains[-2:]) < 1e-3:
            break  # plateaued: PQ's compressed distances cap recall below the target
    return {name: int(value)}, recall


def _recall_lower_bound(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean per-query recall minus two standard errors of that mean."""
    valid = exact_ids >= 0
    hit = (approx_ids[:, :, None] == exact_ids[:, None, :]).any(axis=1) & valid
    per_query = hit.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return float(per_query.mean() - 2 * per_query.std() / math.sqrt(len(per_query)))


def _doublings(limit: int) -> list[int]:
    """1, 2, 4, ... up to and including ``limit``."""
    out = [1]
    while out[-1] < limit:
        out.append(min(out[-1] * 2, limit))
    return out
