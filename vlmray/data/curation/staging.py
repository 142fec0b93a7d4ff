"""Is a staging point complete and valid? Only then is it reused; else it is rebuilt.

A staging (:func:`vlmray.data.curation.twopass.stage_once`: every row after the per-row stages,
as parquet) is a resume point: a crashed or killed job re-runs and reads it back instead of
reading and downloading again. Its ``_SUCCESS`` records what was written (every file, its size
and rows, the total); a re-run reuses the staging only when ``_SUCCESS`` is readable, names the
same settings, and the files on storage are exactly those, with readable footers, the recorded
row counts, and one type per column (a known text column never ``float``: the mark of blocks
that lost their type, :mod:`vlmray.data.curation.blocks`). Anything else (a staging cut off
mid-write, a file lost or truncated, an unreadable ``_SUCCESS``, one written by a version that
recorded none of this, or poisoned by mixed types) is reported and rebuilt.

    record = describe(rows_uri)                       # after writing
    problem = check(record, rows_uri)                 # "" when it can be reused
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.data.curation.blocks import COLUMN_TYPES
from vlmray.data.storage import exists, filesystem

log = logging.getLogger(__name__)


def read_done(done: str) -> dict[str, Any] | None:
    """The ``_SUCCESS`` record, or None when it is absent or unreadable (then: rebuild)."""
    if not exists(done):
        return None
    fs, path = filesystem(done)
    try:
        with fs.open(path, "r") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as e:
        log.warning("unreadable %s (%s): rebuilding", done, e)
        return None
    return record if isinstance(record, dict) else None


def _files(uri: str) -> dict[str, int]:
    """Relative path -> size of every parquet file under ``uri``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return {}
    root = path.rstrip("/") + "/"
    return {p[len(root):] if p.startswith(root) else p: int(info.get("size") or 0)
            for p, info in fs.find(path, detail=True).items() if p.endswith(".parquet")}


def _footers(uri: str, names: list[str]) -> tuple[dict[str, int], list[pa.Schema]]:
    fs, path = filesystem(uri)
    rows, schemas = {}, []
    for name in names:
        with fs.open(f"{path.rstrip('/')}/{name}", "rb") as fh:
            meta = pq.read_metadata(fh)
        rows[name] = meta.num_rows
        schemas.append(meta.schema.to_arrow_schema())
    return rows, schemas


def _type_problem(schemas: list[pa.Schema]) -> str:
    try:
        unified = pa.unify_schemas(schemas, promote_options="default") if schemas else None
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        return f"columns with two types across files: {e}"
    for f in unified or ():
        known = COLUMN_TYPES.get(f.name)
        if known is not None and not pa.types.is_floating(known) and pa.types.is_floating(
                f.type):
            return f"column {f.name!r} is {f.type}, not {known}"
    return ""


def describe(uri: str) -> dict[str, Any]:
    """What the staging under ``uri`` holds, for ``_SUCCESS``: files (size, rows), total rows;
    raises when its own files already disagree on a column's type."""
    files = _files(uri)
    rows, schemas = _footers(uri, sorted(files))
    problem = _type_problem(schemas)
    if problem:
        raise ValueError(f"staging {uri} is not valid: {problem}")
    return {"files": {n: [files[n], rows[n]] for n in sorted(files)},
            "num_rows": int(sum(rows.values()))}


def check(record: dict[str, Any], uri: str) -> str:
    """Why the staging under ``uri`` cannot be reused as ``record`` (its ``_SUCCESS``)
    describes it, or "" when it can."""
    want = record.get("files")
    if not isinstance(want, dict):
        return "its _SUCCESS lists no files (an older or partial staging)"
    have = _files(uri)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        return f"files missing {missing[:3]} / unexpected {extra[:3]}"
    resized = [n for n, (size, _) in want.items() if have[n] != size]
    if resized:
        return f"files changed size: {resized[:3]}"
    try:
        rows, schemas = _footers(uri, sorted(want))
    except (OSError, ValueError, pa.ArrowException) as e:
        return f"unreadable file: {e}"
    if [rows[n] for n in sorted(want)] != [want[n][1] for n in sorted(want)] or sum(
            rows.values()) != record.get("num_rows"):
        return "row counts differ from those recorded"
    return _type_problem(schemas)


__all__ = ["check", "describe", "read_done"]
