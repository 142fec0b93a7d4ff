"""Whole-dataset decisions in two streamed passes, holding only compact columns (SCALE.md).

    pass 1 (stream):  read -> row stages -> live rows' (ROW_ID, KEY, signatures, score) -> parquet
    global (compact): each GlobalStage decides over that table (in a Ray task, not the driver)
                      -> decisions, one parquet file per input file that has any
    pass 2 (stream):  read -> row stages -> FileDecisions (a join by ROW_ID, local to one input
                      file) -> [rewrite] -> decode -> training / the writer

Rows (image bytes, pixels) only ever flow; what is held is one small record per live row, on
storage. The compact side of a billion rows is tens of GB of parquet and a global stage reads
only the columns it needs. The pass-1 output and the decisions are cached under a fingerprint
of the inputs and the settings, so a re-run or a resume skips pass 1.

    root = global_decisions(lambda: apply_row_stages(read_inputs(uri), rows), globals_,
                            cache_root, fingerprint=fp)
    ds = apply_row_stages(apply_row_stages(read_inputs(uri), rows),
                          decision_stages(root, globals_))
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.data import schema
from vlmray.data.curation.stage import (
    Batch,
    Decisions,
    GlobalStage,
    Resources,
    Stage,
    StageOutput,
    filled,
)
from vlmray.data.curation.staging import check, describe, read_done
from vlmray.data.storage import arrow_filesystem, filesystem, join, open_write, remove

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)
_ROW_BITS = 32
SIGNATURES, DECISIONS, DONE = "signatures", "decisions", "_SUCCESS"
FILES_INDEX = "_files.json"
DECISION_COLUMNS = (schema.ROW_ID, schema.REJECT_REASON, schema.DUPLICATE_OF)


def file_index(row_ids: np.ndarray) -> np.ndarray:
    """The input file index of each ``ROW_ID``."""
    return np.asarray(row_ids, dtype=np.int64) >> _ROW_BITS


def compact_columns(stages: Sequence[GlobalStage]) -> list[str]:
    """What pass 1 keeps of each live row: ``ROW_ID``, ``KEY`` and what the stages read."""
    return list(dict.fromkeys([schema.ROW_ID, schema.KEY, *(c for g in stages
                                                            for c in g.columns)]))


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of settings (dataclasses, dicts, lists, strings)."""
    def plain(x: Any) -> Any:
        return asdict(x) if is_dataclass(x) and not isinstance(x, type) else x
    doc = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def inputs_fingerprint(files: Sequence[tuple[str, str]]) -> list[Any]:
    """What identifies the inputs without reading them: each file's URI, format, size and
    version (ETag on object stores, else the modification time), so a file rewritten to the
    same size still invalidates a cache."""
    out: list[Any] = []
    for uri, fmt in files:
        fs, path = filesystem(uri)
        try:
            info = fs.info(path)
        except (OSError, FileNotFoundError):
            info = {}
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        out.append([uri, fmt, int(info.get("size") or -1), str(version)])
    return out


# --- pass 1 ---------------------------------------------------------------------------------


class _LiveCompact:
    """Ray Data batch function: the live rows' compact columns (strings as str, not bytes)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)

    def __call__(self, batch: Batch) -> Batch:
        keep = np.asarray(batch[schema.REJECT_REASON]) == ""
        out: Batch = {}
        for c in self.columns:
            values = np.asarray(batch[c])[keep]
            if values.dtype == object:
                values = np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes)
                                     else ("" if v is None else v) for v in values], dtype=object)
            out[c] = values
        return out


def signature_pass(rows: ray.data.Dataset, stages: Sequence[GlobalStage], uri: str,
                   remote_args: dict[str, Any] | None = None) -> None:
    """Streams the live rows' compact columns to parquet files under ``uri`` (pass 1)."""
    columns = compact_columns(stages)
    missing = sorted(set(columns) - set(rows.columns() or columns))
    if missing:
        raise KeyError(f"pass 1 lacks columns {missing} that {[g.name for g in stages]} read")
    fs, path = arrow_filesystem(uri)
    args = {"num_cpus": 0.25, **(remote_args or {})}
    rows.map_batches(_LiveCompact(columns), batch_format="numpy", batch_size=4096,
                     **args).write_parquet(path, filesystem=fs, ray_remote_args=args)


def read_compact(uri: str, columns: Sequence[str]) -> Batch:
    """The live rows' ``columns`` of the parquet files under ``uri`` (pass 1's signatures, or
    staged rows: then only the compact columns are read, never the images), by ``ROW_ID``."""
    import pyarrow.dataset as pads

    fs, path = arrow_filesystem(uri)
    data = pads.dataset(path, filesystem=fs, format="parquet")
    # a block whose values were all None wrote a null-typed column: unify over every footer
    unified = pa.unify_schemas([f.physical_schema for f in data.get_fragments()],
                               promote_options="permissive")
    data = pads.dataset(path, filesystem=fs, format="parquet", schema=unified)
    live = None
    if schema.REJECT_REASON in data.schema.names:
        live = pads.field(schema.REJECT_REASON) == ""
    table = data.to_table(columns=list(columns), filter=live).sort_by(schema.ROW_ID)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in columns}


def stage_rows(rows: ray.data.Dataset, uri: str) -> None:
    """Streams every row of ``rows`` (rejected ones with their reason, image bytes dropped) to
    parquet under ``uri``: for inputs that must not be fetched twice (URL lists), pass 1 keeps
    the rows on storage and pass 2 reads them back instead of downloading again."""
    fs, path = arrow_filesystem(uri)
    rows.write_parquet(path, filesystem=fs)


def stage_once(rows: Callable[[], ray.data.Dataset], uri: str, *, fingerprint: str) -> str:
    """:func:`stage_rows` into ``<uri>/rows`` unless a complete, valid staging with the same
    fingerprint is there (``<uri>/_SUCCESS`` records every file, its size and rows:
    :mod:`vlmray.data.curation.staging`); else ``uri`` (with the decisions under it) is
    removed and the rows staged again. Returns the rows' URI."""
    out, done = join(uri, "rows"), join(uri, DONE)
    record = _cached(done, fingerprint)
    problem = "no finished staging with these settings" if record is None else check(record, out)
    if problem:
        if record is not None:
            log.warning("staging %s is not reused (%s): rebuilding it", uri, problem)
        remove(uri)
        stage_rows(rows(), out)
        with open_write(done) as fh:
            json.dump({"fingerprint": fingerprint, "rows": out, **describe(out)}, fh)
    return out


def read_staged(uri: str) -> ray.data.Dataset:
    """The rows :func:`stage_rows` wrote, as a lazy plan."""
    import ray.data

    fs, path = arrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs)


# --- the global step ------------------------------------------------------------------------


def _drop(table: Batch, row_ids: np.ndarray) -> Batch:
    keep = ~np.isin(table[schema.ROW_ID], row_ids)
    return {k: v[keep] for k, v in table.items()}


def decide_all(table: Batch, stages: Sequence[GlobalStage]) -> list[tuple[str, Decisions]]:
    """Each stage's decisions in plan order; a row one stage rejects is not seen by the next."""
    out = []
    for g in stages:
        decisions = g.decide(table)
        out.append((g.name, decisions))
        table = _drop(table, decisions.row_ids)
    return out


def write_decisions(root: str, name: str, decisions: Decisions) -> dict[str, int]:
    """One parquet file per input file with rejections (``file-<index>.parquet``: ROW_ID,
    reason, duplicate_of) under ``<root>/<name>``, and ``_files.json`` listing the indices."""
    files = file_index(decisions.row_ids)
    dups = (decisions.duplicate_of if decisions.duplicate_of is not None
            else filled("", len(decisions)))
    present = np.unique(files)
    for f in present:
        sel = files == f
        table = pa.table({schema.ROW_ID: pa.array(decisions.row_ids[sel], pa.int64()),
                          schema.REJECT_REASON: pa.array([str(r) for r in decisions.reasons[sel]]),
                          schema.DUPLICATE_OF: pa.array([str(d or "") for d in dups[sel]])})
        with open_write(join(root, name, f"file-{int(f):08d}.parquet"), "wb") as fh:
            pq.write_table(table, fh)
    with open_write(join(root, name, FILES_INDEX)) as fh:
        json.dump([int(f) for f in present], fh)
    return decisions.counts()


def _decide_task(sig_uri: str, stages: Sequence[GlobalStage], out: str,
                 remote_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reads the compact table, decides, writes the decisions (runs as one Ray task); a first
    stage deciding from storage in many tasks (partitioned dedup) goes its own way first:
    :func:`vlmray.data.curation.dedup_partitioned.decide_stored`."""
    from vlmray.data.curation.dedup_partitioned import decide_stored

    if (summary := decide_stored(sig_uri, stages, out, remote_args)) is not None:
        return summary
    table = read_compact(sig_uri, compact_columns(stages))
    counts = {name: write_decisions(out, name, d) for name, d in decide_all(table, stages)}
    return {"live_rows": int(len(table[schema.ROW_ID])), "rejected": counts}


def _cached(done: str, fp: str) -> dict[str, Any] | None:
    """The ``_SUCCESS`` record written with fingerprint ``fp``; None when absent, unreadable
    or of other settings."""
    summary = read_done(done)
    return summary if summary is not None and summary.get("fingerprint") == fp else None


def global_decisions(rows: Callable[[], ray.data.Dataset] | None,
                     stages: Sequence[GlobalStage], cache_root: str, *, fingerprint: str,
                     staged: str = "", remote_args: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Pass 1 and the global step, or their cached result under ``cache_root``.

    ``rows`` builds the lazy pass-1 plan (called only when there is no cache); or ``staged``
    names rows already on storage (:func:`stage_rows`), whose compact columns are read in
    place. ``remote_args`` (custom resources) place pass 1's writer and the deciding task.
    Returns the summary written to ``<cache_root>/_SUCCESS``: fingerprint, live rows, rows
    each stage rejects, and ``decisions`` (the root :func:`decision_stages` reads).
    """
    import ray

    done = join(cache_root, DONE)
    if (summary := _cached(done, fingerprint)) is not None:
        return summary
    remove(join(cache_root, SIGNATURES))
    remove(join(cache_root, DECISIONS))
    sig_uri, dec_uri = staged or join(cache_root, SIGNATURES), join(cache_root, DECISIONS)
    if not staged:
        assert rows is not None, "global_decisions needs rows or staged"
        signature_pass(rows(), stages, sig_uri, remote_args=remote_args)
    task = ray.remote(_decide_task).options(**{"num_cpus": 1, **(remote_args or {})})
    summary = ray.get(task.remote(sig_uri, list(stages), dec_uri, remote_args))
    summary.update(fingerprint=fingerprint, decisions=dec_uri, signatures=sig_uri)
    with open_write(done) as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    return summary


# --- pass 2 ---------------------------------------------------------------------------------


class FileDecisions(Stage):
    """Marks the rows a global stage rejected, joining its decisions by ``ROW_ID``: a batch
    loads only the decision files of the input files its rows come from (a few KB each,
    cached per worker), so no worker ever holds the whole dataset's decisions."""

    fills: ClassVar[dict[str, Any]] = {schema.DUPLICATE_OF: ""}
    resources = Resources(num_cpus=0.25, batch_size=1024)
    CACHE_FILES: ClassVar[int] = 16

    def __init__(self, root: str, name: str) -> None:
        self.root, self.name = join(root, name), name  # type: ignore[misc]
        self._present: set[int] | None = None
        self._cache: OrderedDict[int, Decisions] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self.name = state["root"], state["name"]  # type: ignore[misc]
        self._present, self._cache = None, OrderedDict()

    def _decisions(self, f: int) -> Decisions | None:
        if self._present is None:
            fs, path = filesystem(join(self.root, FILES_INDEX))
            with fs.open(path, "r") as fh:
                self._present = set(json.load(fh))
        if f not in self._present:
            return None
        if f not in self._cache:
            fs, path = arrow_filesystem(join(self.root, f"file-{f:08d}.parquet"))
            t = pq.read_table(path, filesystem=fs)
            self._cache[f] = Decisions(
                row_ids=t[schema.ROW_ID].to_numpy(),
                reasons=t[schema.REJECT_REASON].to_numpy(zero_copy_only=False),
                duplicate_of=t[schema.DUPLICATE_OF].to_numpy(zero_copy_only=False))
            while len(self._cache) > self.CACHE_FILES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(f)
        return self._cache[f]

    def process(self, batch: Batch) -> StageOutput:
        row_ids = np.asarray(batch[schema.ROW_ID], dtype=np.int64)
        reasons, dups = filled("", len(row_ids)), filled("", len(row_ids))
        files = file_index(row_ids)
        for f in np.unique(files):
            decisions = self._decisions(int(f))
            if decisions is not None:
                sel = files == f
                reasons[sel], dups[sel] = decisions.lookup(row_ids[sel])
        if schema.DUPLICATE_OF in batch:
            dups = np.where(dups == "", batch[schema.DUPLICATE_OF], dups).astype(object)
        return StageOutput(columns={schema.DUPLICATE_OF: dups}, reasons=reasons)


def decision_stages(decisions_root: str, stages: Sequence[GlobalStage]) -> list[Stage]:
    """The pass-2 stages marking each global stage's rejections, in plan order."""
    return [FileDecisions(decisions_root, g.name) for g in stages]


__all__ = ["DECISIONS", "DONE", "FileDecisions", "SIGNATURES", "compact_columns",
           "decide_all", "decision_stages", "file_index", "fingerprint", "global_decisions",
           "inputs_fingerprint", "read_compact", "read_staged", "signature_pass", "stage_once",
           "stage_rows", "write_decisions"]
