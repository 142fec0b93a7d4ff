"""Top-k neighbour search over a saved index: a Ray Data stage and an online actor (what the
neighbours carry is attached by :mod:`vlmray.retrieval.attach`).

    ds = apply_stage(ds, SearchStage(SearchConfig(index="s3://bucket/index/v1", k=8)))

    actor = start_search_actor("s3://bucket/index/v1", name="search")   # get-or-create
    scores, keys = ray.get(actor.search.remote(queries, 8))             # (Q, 8), (Q, 8)

Both go through :func:`search_excluding` (drop the query's own key, the key it duplicates and
near-duplicates by score; keep the best ``k``). ``NEIGHBOURS`` / ``NEIGHBOUR_SCORES`` leave the
stage as object arrays of typed pyarrow arrays (up to ``k`` each), so every Ray Data block is
``list<string>`` / ``list<float>``, even one where no row found a neighbour (Python lists would
make it ``list<null>``); read back from Ray Data, each cell is a 1-D NumPy array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from vlmray.data import schema
from vlmray.data.curation.stage import (
    Batch,
    Resources,
    Stage,
    StageOutput,
    num_rows,
)
from vlmray.retrieval.index import BuiltIndex

__all__ = ["QUERY_COLUMNS", "SearchActor", "SearchConfig", "SearchStage", "ShipsLight", "as_list",
           "check_counts", "object_column", "search_excluding", "start_search_actor", "typed_lists"]

QUERY_COLUMNS = (schema.IMAGE_EMBED, schema.TEXT_EMBED)
MAX_FETCH = 2048
"""Most candidates fetched per query (faiss' GPU limit on k)."""
_LIST_TYPES = {schema.NEIGHBOURS: pa.string(), schema.NEIGHBOUR_SCORES: pa.float32()}


@dataclass(kw_only=True)
class SearchConfig:
    """How :class:`SearchStage` finds each row's neighbours."""

    index: str
    """A directory written by ``BuiltIndex.save`` (local path or s3://)."""
    query_column: str = schema.IMAGE_EMBED
    """The embedding column queried with: ``image_embed`` or ``text_embed``."""
    k: int = 8
    """Neighbours kept per row (fewer when the index runs out of eligible rows)."""
    exclude_self: bool = True
    """Drop the row's own ``key`` from its neighbours."""
    duplicate_threshold: float | None = 0.95
    """Near-duplicates of the row are skipped: for metric ``ip`` a neighbour whose cosine with
    the query is >= this; for ``l2`` one whose squared L2 distance (what the index reports) is
    <= this. None (or, for ip, anything above 1.0) turns it off."""
    overfetch: int = 8
    """Extra candidates fetched so ``k`` remain after exclusion; rows still short are searched
    again with twice as many, up to the index size (or ``MAX_FETCH``)."""
    batch_size: int = 256
    """Rows per search call."""
    actors: int = 1
    """Actors in the pool; each loads the index once."""
    num_cpus: float = 1.0
    """CPUs reserved per actor."""

    def __post_init__(self) -> None:
        if not self.index:
            raise ValueError("SearchConfig.index must name a saved index directory")
        if self.query_column not in QUERY_COLUMNS:
            raise ValueError(f"SearchConfig.query_column={self.query_column!r}; valid choices: "
                             f"{QUERY_COLUMNS}")
        if self.overfetch < 0:
            raise ValueError(f"SearchConfig.overfetch must be >= 0, got {self.overfetch}")
        check_counts(self)


def check_counts(cfg: Any) -> None:
    for name in ("k", "batch_size", "actors"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be >= 1, got "
                             f"{getattr(cfg, name)}")
    if cfg.num_cpus <= 0:
        raise ValueError(f"{type(cfg).__name__}.num_cpus must be > 0, got {cfg.num_cpus}")


# --- the one search-with-exclusion function ---------------------------------------------------


def search_excluding(index: BuiltIndex, queries: np.ndarray, k: int, *,
                     exclude: Sequence[np.ndarray] = (),
                     duplicate_threshold: float | None = None,
                     overfetch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores (Q, k) float32, keys (Q, k) object)`` after exclusion, best first.

    ``exclude``: columns of ``Q`` keys each (the query's own key, what it duplicates; ``""``
    excludes nothing); ``duplicate_threshold``: see :attr:`SearchConfig.duplicate_threshold`.
    Slots left empty hold key ``""`` and score ``-inf`` (ip) / ``+inf`` (l2), as in
    :meth:`BuiltIndex.search`.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude = [np.asarray(col, dtype=object) for col in exclude]
    if any(len(col) != len(queries) for col in exclude):
        raise ValueError(f"exclusion keys must have one entry per query ({len(queries)})")
    ip = index.cfg.metric == "ip"
    out_scores = np.full((len(queries), k), -np.inf if ip else np.inf, dtype=np.float32)
    out_keys = np.full((len(queries), k), "", dtype=object)
    ntotal = int(index.index.ntotal)
    rows = np.arange(len(queries))
    fetch = min(k + overfetch, ntotal, MAX_FETCH)
    while len(rows) and fetch > 0:
        scores, keys = index.search(queries[rows], fetch)                  # (R, F)
        ok = _eligible(scores, keys, [col[rows] for col in exclude], duplicate_threshold, ip)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]               # eligible first
        take = np.take_along_axis(ok, order, axis=1)                        # (R, min(F, k))
        width = take.shape[1]
        out_keys[rows, :width] = np.where(take, np.take_along_axis(keys, order, axis=1), "")
        out_scores[rows, :width] = np.where(take, np.take_along_axis(scores, order, axis=1),
                                            out_scores[rows, :width])
        short = take.sum(axis=1) < k
        if fetch >= min(ntotal, MAX_FETCH):
            break
        rows, fetch = rows[short], min(2 * fetch, ntotal, MAX_FETCH)
    return out_scores, out_keys


def _eligible(scores: np.ndarray, keys: np.ndarray, exclude: list[np.ndarray],
              threshold: float | None, ip: bool) -> np.ndarray:
    """(R, F) bool: a real hit, not an excluded key, not a near-duplicate by score."""
    ok = keys != ""
    for col in exclude:
        ok &= keys != col[:, None]
    if threshold is not None:
        ok &= (scores < threshold) if ip else (scores > threshold)
    return ok


def _queries(column: np.ndarray) -> np.ndarray:
    """A (B, D) float32 matrix from a tensor column or a column of lists/arrays."""
    if column.dtype != object and column.ndim == 2:
        return np.ascontiguousarray(column, dtype=np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in column])           # (B, D)


def as_list(cell: Any) -> list[Any]:
    """A list-column cell as a Python list: pyarrow array (in process), NumPy array (read back
    from Ray Data), list, or None (empty)."""
    if isinstance(cell, (pa.Array, pa.ChunkedArray)):
        return cell.to_pylist()
    return [] if cell is None else list(cell)


def typed_lists(batch: Batch) -> Batch:
    """``batch`` with ``NEIGHBOURS`` / ``NEIGHBOUR_SCORES`` cells as typed pyarrow arrays: Ray
    Data would store the object arrays of NumPy arrays it hands to NumPy batches as pickled
    objects (strings) or tensors (floats); stages passing these columns through call this."""
    for col, typ in _LIST_TYPES.items():
        if col in batch:
            batch[col] = object_column([pa.array(as_list(c), typ) for c in batch[col]])
    return batch


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding each of ``values`` (lists stay lists, not a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# --- the Ray Data stages ----------------------------------------------------------------------


class ShipsLight(Stage):
    """A stage whose heavy attribute (``_heavy``) is loaded in ``setup``, not pickled."""

    _heavy: ClassVar[str] = ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state[self._heavy], state["_ready"] = None, False
        return state


class SearchStage(ShipsLight):
    """Writes ``NEIGHBOURS`` (up to ``k`` keys, best first) and ``NEIGHBOUR_SCORES`` per row.

    The index loads in :meth:`setup`, once per actor. Rows rejected earlier get empty lists.
    """

    name: ClassVar[str] = "search"
    _heavy: ClassVar[str] = "_index"

    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        self.resources = Resources(num_cpus=cfg.num_cpus, actors=cfg.actors,
                                   batch_size=cfg.batch_size)
        self._index: BuiltIndex | None = None

    def setup(self) -> None:
        self._index = BuiltIndex.load(self.cfg.index)

    def __call__(self, batch: Batch) -> Batch:
        batch, n = dict(batch), num_rows(batch)
        for col in _LIST_TYPES:
            batch.setdefault(col, np.full(n, None, dtype=object))
        return typed_lists(super().__call__(batch))

    def process(self, batch: Batch) -> StageOutput:
        if self._index is None:
            self.setup()
        assert self._index is not None
        exclude = []
        if self.cfg.exclude_self and schema.KEY in batch:
            exclude.append(np.asarray(batch[schema.KEY], dtype=object))
        if schema.DUPLICATE_OF in batch:
            exclude.append(np.array(["" if d is None else d for d in batch[schema.DUPLICATE_OF]],
                                    dtype=object))
        scores, keys = search_excluding(
            self._index, _queries(batch[self.cfg.query_column]), self.cfg.k, exclude=exclude,
            duplicate_threshold=self.cfg.duplicate_threshold, overfetch=self.cfg.overfetch)
        real = keys != ""                                                   # (B, k)
        return StageOutput(columns={
            schema.NEIGHBOURS: object_column([list(r[m]) for r, m in zip(keys, real)]),
            schema.NEIGHBOUR_SCORES: object_column([r[m] for r, m in zip(scores, real)])})


# --- the online actor -------------------------------------------------------------------------


class SearchActor:
    """An index held in memory for online queries (e.g. from training workers).

    ``search`` applies the same exclusion as :class:`SearchStage`; with no ``exclude_keys``
    and ``duplicate_threshold=None`` it returns what :meth:`BuiltIndex.search` returns.
    """

    def __init__(self, index_uri: str, *, duplicate_threshold: float | None = None,
                 overfetch: int = 8) -> None:
        self.index = BuiltIndex.load(index_uri)
        self.duplicate_threshold = duplicate_threshold
        self.overfetch = overfetch

    def search(self, vectors: np.ndarray, k: int,
               exclude_keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k) float32, keys (Q, k) object)`` for ``vectors (Q, D)``;
        ``exclude_keys``: one key per query to leave out (its own key), ``""`` = none."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        exclude = [] if exclude_keys is None else [np.asarray(list(exclude_keys), dtype=object)]
        return search_excluding(self.index, vectors, k, exclude=exclude,
                                duplicate_threshold=self.duplicate_threshold,
                                overfetch=self.overfetch)

    def info(self) -> dict[str, Any]:
        """``n``, ``dim``, ``kind`` and ``metric`` of the loaded index."""
        return {"n": int(self.index.index.ntotal), "dim": int(self.index.index.d),
                "kind": self.index.report.get("kind", ""), "metric": self.index.cfg.metric}


def start_search_actor(index_uri: str, *, name: str | None = None, num_cpus: float = 1.0,
                       duplicate_threshold: float | None = None, overfetch: int = 8) -> Any:
    """A :class:`SearchActor` handle; a ``name`` makes it get-or-create (one per namespace),
    so every training worker can call this and share one actor."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus}
    if name:
        options.update(name=name, get_if_exists=True)
    return ray.remote(SearchActor).options(**options).remote(
        index_uri, duplicate_threshold=duplicate_threshold, overfetch=overfetch)



