"""Webdataset shard I/O without Ray: write and read ``.tar`` shards, local or ``s3://``.

A shard holds samples in the img2dataset/webdataset layout: for each key, the members
``{key}.jpg`` (encoded image), ``{key}.txt`` (caption) and ``{key}.json`` (sidecar), grouped
by key. Written shards are byte-reproducible: every member has mtime 0, uid/gid 0, mode 0644.
Samples are plain dicts keyed by :mod:`vlmray.data.schema` names (``KEY``, ``IMAGE``,
``TEXT``, ``META``). Reading groups members by their full path up to the extension
(webdataset's rule: ``a/000.jpg`` and ``b/000.txt`` are two samples) and skips, unread, a
member larger than a byte limit. Curation and training read the same files through
:mod:`vlmray.data.curation.readers`, which shares these rules.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec

from vlmray.config.inputs import ReadConfig
from vlmray.data.schema import IMAGE, KEY, META, TEXT, WDS_SUFFIX
from vlmray.data.storage import ensure_parent, filesystem, join, to_uri

__all__ = [
    "CLASSES_FILE", "MAX_MEMBER_BYTES", "encode_shard", "iter_shard", "iter_shards",
    "list_shards", "load_classes", "member_group", "sample_key", "valid_key", "write_shard",
]

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
_FIELDS = (IMAGE, TEXT, META)                       # member order within a key
_BY_SUFFIX = {suffix: col for col, suffix in WDS_SUFFIX.items()} | {"png": IMAGE, "webp": IMAGE,
                                                                   "jpeg": IMAGE}
_GLOB_CHARS = "*?["
MAX_MEMBER_BYTES = ReadConfig.max_bytes
"""Largest member :func:`iter_shard` reads (``read.max_bytes``'s default); a larger one is
skipped from its header's size, unread, and its column left None."""


def valid_key(key: str) -> bool:
    """Whether ``key`` can name shard members: non-empty, without ``.`` (the suffix
    separator) or ``/`` (a directory)."""
    return bool(key) and "." not in key and "/" not in key


def member_group(name: str) -> tuple[str, str]:
    """``(group, suffix)`` of a tar member, webdataset-style: the member's full path up to the
    first ``.`` of its base name (``a/000.jpg`` -> ``("a/000", "jpg")``), normalised
    (``./000.jpg`` -> ``000``). Grouping by the path, not the base name, keeps ``a/000.jpg``
    and ``b/000.txt`` in two samples, not one image with another sample's caption."""
    path = posixpath.normpath(name).lstrip("/")
    head, base = posixpath.split(path)
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def sample_key(group: str) -> str:
    """The sample key of a member group: the group with ``/`` and ``.`` replaced by ``_``, so
    it is a :func:`valid_key` (``a/000`` -> ``a_000``; a flat shard's keys are unchanged)."""
    return group.replace("/", "_").replace(".", "_")


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar header with fixed metadata, so identical content gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def encode_shard(samples: Iterable[Mapping[str, Any]],
                 image_suffix: str = WDS_SUFFIX[IMAGE]) -> tuple[bytes, int]:
    """Encode samples as tar bytes; returns ``(tar_bytes, num_samples)``.

    Each sample needs ``KEY`` (str without ``.`` or ``/``); ``IMAGE`` (bytes), ``TEXT`` (str)
    and ``META`` (str JSON) are written when present and not None. ``image_suffix`` names the
    image member (``jpg``, ``png``, ``webp``).
    """
    suffixes = {**WDS_SUFFIX, IMAGE: image_suffix}
    buf, count = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            key = str(sample[KEY])
            if not valid_key(key):
                raise ValueError(f"sample key {key!r} must be non-empty, without '.' or '/'")
            for col in _FIELDS:
                if sample.get(col) is not None:
                    tar.addfile(*_member(f"{key}.{suffixes[col]}", _as_bytes(sample[col])))
            count += 1
    return buf.getvalue(), count


def write_shard(
    fs_or_uri: fsspec.AbstractFileSystem | str, path: str, samples: Iterable[Mapping[str, Any]]
) -> int:
    """Write one ``.tar`` shard and return the number of samples written.

    ``fs_or_uri`` is either an fsspec filesystem (then ``path`` is native to it) or a base
    local path / URI (then the shard goes to ``join(fs_or_uri, path)``).
    """
    if isinstance(fs_or_uri, str):
        fs, path = filesystem(join(fs_or_uri, path))
    else:
        fs = fs_or_uri
    data, count = encode_shard(samples)
    ensure_parent(fs, path)
    fs.pipe_file(path, data)
    return count


def _empty(key: str) -> dict[str, Any]:
    return {KEY: key, IMAGE: None, TEXT: None, META: None}


def _decode(col: str, data: bytes) -> bytes | str:
    return data if col == IMAGE else data.decode("utf-8")


def iter_shard(uri: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard in order, as ``{KEY, IMAGE, TEXT, META}`` dicts.

    ``IMAGE`` is bytes, ``TEXT`` and ``META`` are str; a member missing from the shard is None.
    Members are grouped by :func:`member_group` and keyed by :func:`sample_key`. Members with
    unknown suffixes are ignored; one over ``max_member_bytes`` is skipped unread (logged), its
    column left None, so one huge member cannot exhaust memory.
    """
    fs, path = filesystem(uri)
    current: dict[str, Any] | None = None
    group = ""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name, suffix = member_group(info.name)
            col = _BY_SUFFIX.get(suffix)
            if col is None:
                continue
            if current is not None and group != name:
                yield current
                current = None
            current, group = current or _empty(sample_key(name)), name
            if info.size > max_member_bytes:
                log.warning("%s: member %s has %d bytes (> %d): skipped", uri, info.name,
                            info.size, max_member_bytes)
                continue
            member = tar.extractfile(info)
            current[col] = _decode(col, member.read() if member else b"")
    if current is not None:
        yield current


def list_shards(uri: str) -> list[str]:
    """Sorted ``*.tar`` URIs: those in a directory, those matching a glob, or the file itself."""
    fs, path = filesystem(uri)
    if any(c in uri for c in _GLOB_CHARS):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.ls(path, detail=False) if fnmatch.fnmatch(p, "*.tar")]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"no shard or directory at {uri}")
    return sorted(to_uri(fs, p) for p in found)


def iter_shards(uri: str) -> Iterator[dict[str, Any]]:
    """Yield samples from every shard :func:`list_shards` finds for ``uri``, in shard order."""
    for shard in list_shards(uri):
        yield from iter_shard(shard)


def load_classes(eval_dir: str) -> tuple[list[str], list[str]]:
    """Read ``classes.json`` under ``eval_dir``: ``(classnames, templates)``.

    Templates contain one ``{}`` where the classname goes, e.g. ``"a photo of a {}."``.
    """
    fs, path = filesystem(join(eval_dir, CLASSES_FILE))
    with fs.open(path, "r") as f:
        doc = json.load(f)
    return list(doc["classnames"]), list(doc["templates"])
