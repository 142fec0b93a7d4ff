"""Near-duplicate images across partitions: each image's 64-bit phash is routed to the band
partitions where a close pair must meet (:func:`routes`), candidate pairs are found per band
partition (:func:`band_task`), and only the sparse pair graph is resolved in one task
(:func:`resolve_task`), so no task holds every hash. :func:`near_pairs` runs the three steps
for one round of :mod:`vlmray.data.curation.dedup_partitioned`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.data import schema
from vlmray.data.curation.dedup import (
    _by_first_occurrence,
    _earliest_kept,
    band_blocks,
    close_pairs,
)
from vlmray.data.curation.scatter import (
    DST,
    DST_VALUE,
    SRC,
    SRC_KEY,
    UP_KEY,
    UP_ROW,
    VALUE,
    Runner,
    Scattered,
    gather,
    partition_of,
    scatter,
    to_batch,
    to_table,
)
from vlmray.data.storage import arrow_filesystem, join, open_write

if TYPE_CHECKING:
    from vlmray.data.curation.dedup_partitioned import Round

ROUTE_SPREAD_BITS = 10
"""A route has at least log2(P) + this many bits, so its values spread evenly over P."""


def routes(n: int, threshold: int, parts: int) -> list[list[int]]:
    """The band masks (:func:`~vlmray.data.curation.dedup.band_masks` for n hashes) grouped
    by route, the route's mask first: a route is the leading blocks of a mask, at least
    log2(parts) + :data:`ROUTE_SPREAD_BITS` bits (or all of it)."""
    import itertools

    blocks = band_blocks(n, threshold)
    need = min(64, math.ceil(math.log2(max(parts, 2))) + ROUTE_SPREAD_BITS)
    grouped: dict[int, list[int]] = {}
    for combo in itertools.combinations(blocks, len(blocks) - threshold):
        route = 0
        for block in combo:
            route |= block
            if route.bit_count() >= need:
                break
        grouped.setdefault(route, []).append(sum(combo))
    return [[route, *masks] for route, masks in grouped.items()]


def values_task(inputs: list[str], q: int, route_masks: list[int], parts: int,
                out: str) -> str | None:
    """The distinct hashes of one phash partition, each with its first row (ROW_ID, KEY),
    scattered once per route to band partition ``route * parts + hash(value & route) % parts``."""
    rows = to_batch(gather(inputs, q, [schema.ROW_ID, schema.KEY, schema.PHASH]))
    if not len(rows[schema.ROW_ID]):
        return None
    uniq, first, _ = _by_first_occurrence(rows[schema.PHASH].astype(np.int64))
    first_ids = rows[schema.ROW_ID][first]
    table = to_table({VALUE: uniq, schema.ROW_ID: first_ids, schema.KEY: rows[schema.KEY][first]})
    u = uniq.view(np.uint64)
    return scatter(out, ((table, r * parts + partition_of((u & np.uint64(route)).view(np.int64),
                                                          parts, first_ids))
                         for r, route in enumerate(route_masks)))


def band_task(inputs: list[str], p: int, groups: list[list[int]], threshold: int, parts: int,
              out: str) -> str | None:
    """Band partition ``p`` of every route: the pairs of hashes within ``threshold`` bits
    that share one of the route's band keys, as (earlier first row, later first row, the
    earlier's KEY, the later's hash). One route's records in memory at a time."""
    found, records = [], Scattered(inputs)
    for r, (_, *masks) in enumerate(groups):
        rec = to_batch(records.read(r * parts + p, [VALUE, schema.ROW_ID, schema.KEY]))
        i, j = close_pairs(rec[VALUE], threshold, masks=masks)
        if len(i):
            ids = rec[schema.ROW_ID]
            found.append(to_table({SRC: ids[i], DST: ids[j], SRC_KEY: rec[schema.KEY][i],
                                   DST_VALUE: rec[VALUE][j]}))
    if not found:
        return None
    with open_write(out, "wb") as fh:
        pq.write_table(pa.concat_tables(found), fh)
    return out


def resolve_task(pair_files: list[str], parts: int, out: str) -> str | None:
    """ONE task over the near-duplicate pair graph (its size: pairs, not rows): the hashes,
    named by their first rows and walked in that order, go as ``_earliest_kept`` says; each
    dropped hash -> its earliest kept neighbour's KEY, scattered by the hash's partition."""
    tables = []
    for uri in pair_files:
        fs, path = arrow_filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    pairs = to_batch(pa.concat_tables(tables), by_row=None)
    nodes = np.unique(np.r_[pairs[SRC], pairs[DST]])        # by first row = the walk's order
    src, dst = np.searchsorted(nodes, pairs[SRC]), np.searchsorted(nodes, pairs[DST])
    key = np.empty(len(nodes), dtype=object)
    key[src] = pairs[SRC_KEY]
    value = np.zeros(len(nodes), dtype=np.int64)
    value[dst] = pairs[DST_VALUE]
    order = np.lexsort((src, dst))
    src, dst = src[order], dst[order]
    once = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]   # one pair, many bands
    parent = _earliest_kept(src[once], dst[once], len(nodes))
    gone = np.flatnonzero(parent >= 0)
    table = to_table({VALUE: value[gone], UP_ROW: nodes[parent[gone]], UP_KEY: key[parent[gone]]})
    return scatter(out, [(table, partition_of(value[gone], parts, nodes[gone]))])


def near_pairs(step: Round, inputs: list[str], alive: int, run: Runner) -> str | None:
    """Values -> bands -> resolution for the near rule's ``inputs`` (scattered by phash);
    returns the scatter file of dropped hashes (None: none, e.g. threshold 0)."""
    threshold, parts = step.cfg.phash_threshold, step.parts
    if threshold == 0 or not inputs:
        return None                                  # distinct hashes are never 0 bits apart
    groups = routes(alive, threshold, parts)
    base = join(step.out, "near")
    values = run(values_task, [(inputs, q, [g[0] for g in groups], parts,
                                join(base, "values", f"{q:05d}.parquet")) for q in range(parts)])
    values = [v for v in values if v]
    pairs = run(band_task, [(values, p, groups, threshold, parts,
                             join(base, "pairs", f"{p:05d}.parquet")) for p in range(parts)])
    pairs = [p for p in pairs if p]
    if not pairs:
        return None
    return run(resolve_task, [(pairs, parts, join(base, "dropped.parquet"))])[0]


__all__ = ["ROUTE_SPREAD_BITS", "band_task", "near_pairs", "resolve_task", "routes", "values_task"]
