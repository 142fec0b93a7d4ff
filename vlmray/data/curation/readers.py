"""Readers of curation inputs: webdataset tars, parquet tables and URL lists, local or ``s3://``.

Every input file becomes one NumPy batch of raw rows (``KEY``, ``IMAGE``, ``TEXT``, ``META``,
``URL``) with provenance (``SOURCE``, ``ROW_ID``) and the read's verdict (``REJECT_REASON``,
``REJECT_STAGE`` = ``read`` or ""). Content is not judged here: caption bytes stay undecoded, a
repeated key stays a separate row, a truncated tar yields the rows before the cut; later
stages reject, with a reason, whatever is bad. What the read itself must refuse is rejected
here, with a reason, and never read or never reaches a writer (:data:`READ_REASONS`):

* a key that cannot name shard members (``.`` or ``/`` in a table's key column):
  ``invalid_key``; tar members are grouped by their full path up to the extension and keyed
  by it with ``/`` and ``.`` made ``_`` (:func:`vlmray.data.shards.member_group`);
* an image path outside the table's folder (``../``), or absolute / a URI without
  ``read.allow_absolute_paths``: ``image_path_outside_input``; an ``http(s)://`` image path:
  ``url_belongs_in_url_column`` (the downloader fetches URLs, with its checks);
* a path that is not a regular file (``/dev/zero``, a directory): ``image_path_not_a_file``;
* an image file or tar member over ``read.max_bytes``: ``file_too_large``, from its size,
  before its bytes are read;
* the last row of a tar that ends early, when it was cut: ``truncated_shard``
  (:mod:`vlmray.data.curation.truncation`).

    list_inputs("s3://raw/laion/")            # [("s3://raw/laion/00000.tar", "webdataset"), ...]
    ds = read_inputs("s3://raw/laion/")       # Ray Data: one read task per input file
    batch = read_inputs_local("urls.csv")     # plain Python, for tests and small jobs
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.data import PlacementConfig
from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.image_paths import (
    FILE_TOO_LARGE,
    IMAGE_PATH_NOT_A_FILE,
    IMAGE_PATH_OUTSIDE_INPUT,
    URL_BELONGS_IN_URL_COLUMN,
)
from vlmray.data.curation.table_rows import table_rows
from vlmray.data.curation.truncation import TRUNCATED_SHARD, lacks_end_marker, mark_cut
from vlmray.data.placement import apply_budget, remote_args
from vlmray.data.shards import member_group, sample_key, valid_key
from vlmray.data.storage import arrow_filesystem, filesystem, to_uri

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
ARROW_SCHEMA = pa.schema([(schema.KEY, pa.string()), (schema.IMAGE, pa.binary()),
                          (schema.TEXT, pa.binary()), (schema.META, pa.string()),
                          (schema.URL, pa.string()), (schema.SOURCE, pa.string()),
                          (schema.ROW_ID, pa.int64()), (schema.REJECT_REASON, pa.string()),
                          (schema.REJECT_STAGE, pa.string())])
COLUMNS: tuple[str, ...] = tuple(ARROW_SCHEMA.names)   # every batch a reader returns has these
_ROW_COLUMNS = COLUMNS[:5]                       # what a reader fills; then SOURCE, ROW_ID

READ_STAGE = "read"
"""The ``REJECT_STAGE`` of rows the read rejects (a stage of the curation stats)."""
INVALID_KEY = "invalid_key"
READ_REASONS = (INVALID_KEY, IMAGE_PATH_OUTSIDE_INPUT, URL_BELONGS_IN_URL_COLUMN,
                IMAGE_PATH_NOT_A_FILE, FILE_TOO_LARGE, TRUNCATED_SHARD)
_EXTENSIONS = {".tar": "webdataset", ".tar.gz": "webdataset", ".tgz": "webdataset",
               ".parquet": "parquet", ".csv": "urls", ".tsv": "urls", ".jsonl": "urls",
               ".txt": "urls"}
_READS = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",),
          "urls": (".csv", ".tsv", ".jsonl", ".txt", ".parquet")}
_AUTO_NAMES = {                                  # role -> column names tried, in order
    "key": ("key", "__key__", "id"),
    "image": ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes"),
    "image_path": ("image_path", "file_name", "filename", "path"),
    "text": ("caption", "text", "txt", "alt", "TEXT"),
    "url": ("url", "URL", "image_url"),
    "meta": ("json", "meta"),
}
_SUFFIX_COLUMN = {**dict.fromkeys(("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff"),
                                  schema.IMAGE), "txt": schema.TEXT, "json": schema.META}
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_GLOB_CHARS = "*?["
READ_CPUS = 0.5   # equal remote args let the text stage fuse with it; half a core each leaves
                  # room beside training workers and retrieval actors on a small node
_VALID = ("valid formats: webdataset (.tar, .tar.gz, .tgz), parquet (.parquet), urls (.csv, "
          ".tsv, .jsonl, .txt, or a .parquet with a URL column and no image column)")


# --- listing ------------------------------------------------------------------------------


def _extension(path: str) -> str:
    name = posixpath.basename(path).lower()
    return next((e for e in sorted(_EXTENSIONS, key=len, reverse=True) if name.endswith(e)), "")


def _resolve_columns(names: Sequence[str], cfg: ReadConfig, source: str, *,
                     need_image_or_url: bool = False) -> dict[str, str | None]:
    """Role (key, image, image_path, text, url, meta) -> column name in ``names`` or None."""
    roles: dict[str, str | None] = {}
    for role, candidates in _AUTO_NAMES.items():
        chosen = getattr(cfg, f"{role}_column")
        if chosen and chosen not in names:
            raise ValueError(f"{source}: read.{role}_column={chosen!r} is not a column; "
                             f"columns: {sorted(names)}")
        roles[role] = chosen or next((c for c in candidates if c in names), None)
    if cfg.image_path_column:
        roles["image"] = None
    elif roles["image"]:                         # bytes win over paths when both are there
        roles["image_path"] = None
    if need_image_or_url and not (roles["image"] or roles["image_path"] or roles["url"]):
        raise ValueError(f"{source}: no image, image path or URL column among {sorted(names)}; "
                         "set read.image_column, read.image_path_column or read.url_column")
    return roles


def _parquet_columns(uri: str) -> list[str]:
    afs, path = arrow_filesystem(uri)
    return list(pq.read_schema(path, filesystem=afs).names)


def _format_of(uri: str, cfg: ReadConfig, *, strict: bool) -> str | None:
    """The format to read ``uri`` as; None (or ValueError when ``strict``) if it is not one."""
    ext = _extension(uri)
    if cfg.format != "auto":
        if ext in _READS[cfg.format]:
            return cfg.format
        if strict:
            raise ValueError(f"{uri}: read.format={cfg.format!r} reads "
                             f"{', '.join(_READS[cfg.format])} files")
        return None
    fmt = _EXTENSIONS.get(ext)
    if fmt is None:
        if strict:
            raise ValueError(f"{uri}: unknown input format; {_VALID}")
        return None
    if fmt == "parquet":
        roles = _resolve_columns(_parquet_columns(uri), cfg, uri, need_image_or_url=True)
        return "urls" if roles["url"] and not roles["image"] and not roles["image_path"] else fmt
    return fmt


def _drop_sidecars(paths: list[str]) -> list[str]:
    """Where a listing holds ``.tar`` shards, the other files are their metadata (img2dataset's
    ``00000.parquet`` URL lists and stats, the built-in data's ``manifest.parquet``)."""
    is_tar = [_EXTENSIONS.get(_extension(p)) == "webdataset" for p in paths]
    kept = [p for p, t in zip(paths, is_tar) if t] if any(is_tar) else paths
    if len(kept) < len(paths):
        log.info("skipping %d metadata files next to .tar shards", len(paths) - len(kept))
    return kept


def list_inputs(uri: str, cfg: ReadConfig | None = None) -> list[tuple[str, str]]:
    """Sorted ``(file URI, format)`` pairs: files of a directory (not recursive; hidden and
    ``_``-prefixed files skipped; next to ``.tar`` shards other files are metadata), files
    matching a glob, or one file. Format is one of ``webdataset``, ``parquet``, ``urls``."""
    cfg = cfg or ReadConfig()
    fs, path = filesystem(uri)
    listing = False
    if any(c in uri for c in _GLOB_CHARS):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        found = [info["name"] for info in fs.ls(path, detail=True) if info["type"] == "file"]
        listing = True
    elif fs.isfile(path):
        one = to_uri(fs, path)
        return [(one, str(_format_of(one, cfg, strict=True)))]
    else:
        raise FileNotFoundError(f"no input file, directory or glob matches at {uri}")
    found = [p for p in found if not posixpath.basename(p).startswith((".", "_"))]
    if cfg.format == "auto" and listing:       # a glob is an explicit choice of files
        found = _drop_sidecars(found)
    pairs = [(u, _format_of(u, cfg, strict=False)) for u in sorted(to_uri(fs, p) for p in found)]
    out = [(u, fmt) for u, fmt in pairs if fmt is not None]
    if not out:
        wanted = f"{', '.join(_READS[cfg.format])} files" if cfg.format != "auto" else _VALID
        raise FileNotFoundError(f"no inputs at {uri} among {len(found)} files "
                                f"(read.format={cfg.format!r}; {wanted})")
    return out


# --- reading one file -----------------------------------------------------------------------


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _to_batch(rows: dict[str, list[Any]], uri: str, file_index: int) -> Batch:
    """The batch of a file's rows; a given key that cannot name shard members is rejected
    here (``invalid_key``), so it never reaches, and fails, a writer after all the work."""
    n = len(rows[schema.KEY])
    if n >= 1 << 32 or not 0 <= file_index < 1 << 31:
        raise ValueError(f"{uri}: {n} rows / file index {file_index} overflow ROW_ID")
    keys = [k if k else f"{file_index:05d}{i:06d}" for i, k in enumerate(rows[schema.KEY])]
    reasons = list(rows.get(schema.REJECT_REASON) or [""] * n)
    reasons = [r or ("" if valid_key(k) else INVALID_KEY) for r, k in zip(reasons, keys)]
    images = [None if r else v for r, v in zip(reasons, rows[schema.IMAGE])]
    if any(reasons):
        log.warning("%s: %d rows rejected at read: %s", uri, sum(map(bool, reasons)),
                    dict(sorted((r, reasons.count(r)) for r in set(reasons) if r)))
    return {schema.KEY: _objects(keys), schema.IMAGE: _objects(images),
            schema.TEXT: _objects(rows[schema.TEXT]), schema.META: _objects(rows[schema.META]),
            schema.URL: _objects([u or "" for u in rows[schema.URL]]),
            schema.SOURCE: _objects([uri] * n),
            schema.ROW_ID: (np.int64(file_index) << 32) | np.arange(n, dtype=np.int64),
            schema.REJECT_REASON: _objects(reasons),
            schema.REJECT_STAGE: _objects([READ_STAGE if r else "" for r in reasons])}


def _tar_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(group, column)`` of a member (:func:`~vlmray.data.shards.member_group`: its full path
    up to the extension), or None for members we ignore."""
    if not info.isfile():
        return None
    group, suffix = member_group(info.name)
    col = _SUFFIX_COLUMN.get(suffix.lower())
    return (group, col) if col else None


def _read_tar(uri: str, max_bytes: int) -> list[dict[str, Any]]:
    """Rows of a tar in member order; a group that re-appears (or repeats a member) is a new
    row. A member over ``max_bytes`` is skipped unread (the stream seeks past it) and its row
    rejected (``file_too_large``); a last row cut by a truncated tar is ``truncated_shard``."""
    fs, path = filesystem(uri)
    rows: list[dict[str, Any]] = []
    row: dict[str, Any] = {}
    group, seen, reading = "", set(), False
    tar = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                member = _tar_member(info)
                if member is None:
                    continue
                name, col = member
                if not rows or group != name or col in seen:
                    row = {**dict.fromkeys(_ROW_COLUMNS), schema.KEY: sample_key(name),
                           schema.REJECT_REASON: ""}
                    rows.append(row)
                    group, seen = name, set()
                seen.add(col)
                if info.size > max_bytes:
                    row[schema.REJECT_REASON] = row[schema.REJECT_REASON] or FILE_TOO_LARGE
                    continue
                reading = True
                data = tar.extractfile(info)
                value = data.read() if data else b""
                reading = False
                row[col] = value.decode("utf-8", "replace") if col == schema.META else value
    except _TAR_ERRORS as e:
        cut = mark_cut(rows[-1] if rows else None, inside_member=reading)
        log.warning("truncated or corrupt tar %s: kept %d rows (%s): %s", uri, len(rows),
                    "the last one cut: truncated_shard" if cut else "the last one whole", e)
        return rows
    if _extension(path) == ".tar" and lacks_end_marker(fs.size(path), tar):
        mark_cut(rows[-1] if rows else None, inside_member=False)
        log.warning("truncated tar %s: no end-of-archive marker after %d rows", uri, len(rows))
    return rows


def _table_columns(uri: str, cfg: ReadConfig) -> dict[str, list[Any]]:
    """All columns of a CSV/TSV/JSONL/TXT file as lists (parquet is read by column)."""
    ext = _extension(uri)
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        if ext == ".txt":
            return {cfg.url_column or "url": [line.strip() for line in text if line.strip()]}
        if ext == ".jsonl":
            records = [_json_record(line, uri) for line in text if line.strip()]
            names = list(dict.fromkeys(k for r in records for k in r))
            return {name: [r.get(name) for r in records] for name in names}
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if ext == ".tsv" else {}
        reader = csv.DictReader(text, **dialect)
        records = list(reader)
        return {name: [r.get(name) for r in records] for name in reader.fieldnames or []}


def _json_record(line: str, uri: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as e:
        log.warning("%s: unparseable JSON line kept as an empty row: %s", uri, e)
        return {}
    return record if isinstance(record, dict) else {}


def _read_table(uri: str, cfg: ReadConfig) -> dict[str, list[Any]]:
    if _extension(uri) == ".parquet":
        names = _parquet_columns(uri)
        roles = _resolve_columns(names, cfg, uri, need_image_or_url=True)
        afs, path = arrow_filesystem(uri)
        wanted = list(dict.fromkeys(c for c in roles.values() if c))
        table = pq.read_table(path, columns=wanted, filesystem=afs)
        columns, n = table.to_pydict(), table.num_rows
    else:
        columns = _table_columns(uri, cfg)
        roles = _resolve_columns(list(columns), cfg, uri, need_image_or_url=True)
        n = len(next(iter(columns.values()), []))
    return table_rows(columns, roles, n, uri, cfg)


def read_file(uri: str, file_index: int, fmt: str, cfg: ReadConfig | None = None) -> Batch:
    """All rows of one input file as a NumPy batch with exactly :data:`COLUMNS`.

    ``IMAGE``/``TEXT`` are bytes or None (text is not decoded), ``META`` str or None, ``URL``
    str ("" when none), ``SOURCE`` is ``uri``, ``ROW_ID`` is ``(file_index << 32) | row``;
    ``REJECT_REASON`` is one of :data:`READ_REASONS` (``REJECT_STAGE`` ``read``, ``IMAGE``
    None) or "" for rows the read passes on.
    """
    cfg = cfg or ReadConfig()
    if fmt == "webdataset":
        rows = _read_tar(uri, cfg.max_bytes)
        columns = {c: [r[c] for r in rows] for c in (*_ROW_COLUMNS, schema.REJECT_REASON)}
    elif fmt in ("parquet", "urls"):
        columns = _read_table(uri, cfg)
    else:
        raise ValueError(f"{uri}: format {fmt!r}; valid: webdataset, parquet, urls")
    return _to_batch(columns, uri, file_index)


# --- reading many files ---------------------------------------------------------------------


def read_inputs(uri: str, cfg: ReadConfig | None = None,
                placement: PlacementConfig | None = None) -> ray.data.Dataset:
    """A Ray Data plan reading every input file in its own read task (rows of a file in order;
    the per-row stages after it run in the same task). With ``placement`` the read tasks ask
    for its custom resources, at most ``read_concurrency`` run at once, and the plan carries
    its object-store budget and block size (:func:`~vlmray.data.placement.apply_budget` on the
    dataset's own context)."""
    import ray.data

    from vlmray.data.curation.source import InputFiles

    files = list_inputs(uri, cfg)
    if placement is None:
        return ray.data.read_datasource(InputFiles(files, cfg), override_num_blocks=len(files))
    ds = ray.data.read_datasource(InputFiles(files, cfg), override_num_blocks=len(files),
                                  concurrency=placement.read_concurrency or None,
                                  **remote_args(placement, READ_CPUS))
    apply_budget(placement, ds.context)
    return ds


def read_inputs_local(uri: str, cfg: ReadConfig | None = None) -> Batch:
    """Every input file read in this process, concatenated in file order (no Ray)."""
    batches = [read_file(u, i, fmt, cfg) for i, (u, fmt) in enumerate(list_inputs(uri, cfg))]
    return {c: np.concatenate([b[c] for b in batches]) for c in COLUMNS}


__all__ = ["ARROW_SCHEMA", "COLUMNS", "INVALID_KEY", "READ_REASONS", "READ_STAGE",
           "TRUNCATED_SHARD", "list_inputs", "read_file", "read_inputs", "read_inputs_local"]
