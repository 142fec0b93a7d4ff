"""Exact accounting for streamed ingest: every input row counted once, however often the
stream re-reads it. Training reads straight through the lazy read -> [curate] -> [rewrite] ->
decode plan (:func:`vlmray.data.ingest.stream_ingest`) every epoch, and nothing is materialised.

Every row carries ``ROW_ID`` ((input file index << 32) | row index), and one small Ray actor,
:class:`StreamTally`, keeps a bitmap of the row ids seen per input file. The split stage asks it
which rows of each batch are new: only new rows are counted (by reject reason) and only new
rejected rows are written to ``rejects/``, so a row re-read in a later epoch — or in a
differently composed batch — is never counted or written twice. Memory is one bit per input row
in that actor (about 225 MB for 1.8 billion rows), not the data. With ``data.rewrite`` on, the
rewrite prefix's fallbacks of new rows are counted there too.

    train, tally = stream_ingest(cfg.data, "s3://bucket/shards", rejects_uri="runs/x/rejects")
    ...                                   # training consumes ``train``
    summary = stream_summary(tally)       # rows seen so far: in == accepted + rejected
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.accounting import REJECT_COLUMNS, check_identity
from vlmray.data.storage import arrow_filesystem, join

_ROW_BITS = 32
FALLBACK_COLUMNS = {schema.REWRITE_FALLBACKS: "rewrite_fallbacks",
                    schema.CAPTION_FALLBACK: "caption_fallbacks"}
"""Fallback column of the rewrite prefix -> its summary key (reason -> count)."""


def count_fallbacks(batch: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Rewrite-prefix outcomes of a batch: ``{"rewrite_fallbacks": {reason: n},
    "caption_fallbacks": {reason: n}}`` for the fallback columns it has; ``kept`` counts the
    rewrites (captions) the LLM's output was used for, every other key a fallback reason."""
    out: dict[str, dict[str, int]] = {}
    for column, key in FALLBACK_COLUMNS.items():
        if column not in batch:
            continue
        counts = out.setdefault(key, {})
        for value in batch[column]:
            values = [value] if isinstance(value, (str, bytes)) or value is None else value
            for reason in values:
                name = str(reason or "") or "kept"
                counts[name] = counts.get(name, 0) + 1
    return out


class StreamTally:
    """Counts each input row once, however often the stream re-reads it (a Ray actor)."""

    def __init__(self) -> None:
        self.seen: dict[int, np.ndarray] = {}      # input file index -> bit per row index
        self.rows_in = 0
        self.reasons: Counter[str] = Counter()
        self.fallbacks: dict[str, Counter[str]] = {}

    def add(self, row_ids: np.ndarray, reasons: np.ndarray,
            fallbacks: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Marks ``row_ids`` seen; returns the bool mask of rows seen for the first time and
        counts those (rejected ones by ``reasons``, "" = accepted; and the rewrite prefix's
        ``fallbacks`` columns, :func:`count_fallbacks`)."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        files, rows = row_ids >> _ROW_BITS, row_ids & ((1 << _ROW_BITS) - 1)
        new = np.zeros(len(row_ids), dtype=bool)
        for f in np.unique(files):
            sel = np.flatnonzero(files == f)
            r = rows[sel]
            bits = self._bits(int(f), int(r.max()) + 1)
            byte, mask = r >> 3, (1 << (r & 7)).astype(np.uint8)
            new[sel] = (bits[byte] & mask) == 0
            np.bitwise_or.at(bits, byte, mask)
        self.rows_in += int(new.sum())
        self.reasons.update(str(r) for r in np.asarray(reasons, dtype=object)[new] if r)
        if fallbacks:
            for key, counts in count_fallbacks({c: v[new] for c, v in fallbacks.items()}).items():
                self.fallbacks.setdefault(key, Counter()).update(counts)
        return new

    def _bits(self, f: int, rows: int) -> np.ndarray:
        """File ``f``'s bitmap (one bit per row index), grown to hold ``rows`` rows."""
        size = (rows + 7) // 8
        bits = self.seen.get(f)
        if bits is None or len(bits) < size:
            grown = np.zeros(max(size, 2 * len(bits) if bits is not None else size), np.uint8)
            if bits is not None:
                grown[: len(bits)] = bits
            self.seen[f] = bits = grown
        return bits

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far, as plain types and arrays (saved in checkpoints)."""
        files = sorted(self.seen)
        return {"files": np.asarray(files, dtype=np.int64),
                "bits": [self.seen[f] for f in files], "rows_in": self.rows_in,
                "reasons": dict(self.reasons),
                "fallbacks": {k: dict(c) for k, c in self.fallbacks.items()}}

    def restore(self, snap: dict[str, Any]) -> None:
        """Replaces the counts with a :meth:`snapshot`'s: rows counted then stay counted, rows
        read since are counted again when re-read (a resumed run re-reads them)."""
        self.seen = {int(f): np.array(b, dtype=np.uint8)
                     for f, b in zip(np.asarray(snap["files"]).tolist(), snap["bits"])}
        self.rows_in = int(snap["rows_in"])
        self.reasons = Counter({str(k): int(v) for k, v in snap["reasons"].items()})
        self.fallbacks = {str(k): Counter({str(r): int(n) for r, n in c.items()})
                          for k, c in snap["fallbacks"].items()}

    def totals(self) -> dict[str, Any]:
        rejected = sum(self.reasons.values())
        return {"rows_in": self.rows_in, "rows_accepted": self.rows_in - rejected,
                "rows_rejected": rejected, "reject_reasons": dict(sorted(self.reasons.items())),
                **{k: dict(sorted(c.items())) for k, c in sorted(self.fallbacks.items())}}


class SplitStage:
    """Ray Data batch function over decoded rows: counts new rows with the tally, writes new
    rejected rows (the curation job's reject columns: key, text, url, source, row_id, stage,
    reason, duplicate_of, repairs) as one parquet file per batch, and returns the accepted
    rows' training columns."""

    def __init__(self, tally: Any, rejects_uri: str | None, columns: list[str]) -> None:
        self.tally, self.rejects_uri, self.columns = tally, rejects_uri, columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        reasons = batch[schema.REJECT_REASON]
        fallbacks = {c: batch[c] for c in FALLBACK_COLUMNS if c in batch}
        new = ray.get(self.tally.add.remote(batch[schema.ROW_ID], reasons, fallbacks))
        rejected = new & (reasons != "")
        if self.rejects_uri and rejected.any():
            self._write_rejects({c: batch[c][rejected] for c in REJECT_COLUMNS if c in batch},
                                batch[schema.ROW_ID][rejected])
        keep = reasons == ""
        return {c: batch[c][keep] for c in self.columns}

    def _write_rejects(self, cols: dict[str, np.ndarray], row_ids: np.ndarray) -> None:
        """One parquet file of rejected rows with curation's columns (:data:`REJECT_COLUMNS`,
        in its order, sorted by ``ROW_ID``): a column the batch lacks (``duplicate_of``
        without dedup, ``url`` without a downloader) is "", ``row_id`` int64."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        digest = hashlib.sha1(np.sort(row_ids).tobytes()).hexdigest()[:16]
        fs, path = arrow_filesystem(join(self.rejects_uri, f"stream-{digest}.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        order = np.argsort(np.asarray(row_ids, dtype=np.int64), kind="stable")
        table = pa.table({c: pa.array(np.asarray(row_ids, dtype=np.int64)[order], pa.int64())
                          if c == schema.ROW_ID else
                          pa.array([_text(v) for v in np.asarray(
                              cols.get(c, [""] * len(order)), dtype=object)[order]], pa.string())
                          for c in REJECT_COLUMNS})
        pq.write_table(table, path, filesystem=fs)


def _text(value: Any) -> str:
    """A rejects-file value as str: bytes decoded (with replacement), None / NaN -> ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def stream_summary(tally: Any) -> dict[str, Any]:
    """The tally's counts of the rows read so far, checked: in == accepted + rejected."""
    import ray

    totals = ray.get(tally.totals.remote())
    check_identity(totals["rows_in"], rows_out=totals["rows_accepted"],
                   rows_rejected=totals["rows_rejected"], where="streaming ingest")
    return {**totals, "streamed": True}


__all__ = ["FALLBACK_COLUMNS", "SplitStage", "StreamTally", "count_fallbacks", "stream_summary"]
