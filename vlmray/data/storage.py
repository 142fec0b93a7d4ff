"""Storage: one way to reach a local path or an ``s3://`` URI.

Everything that touches files goes through :func:`filesystem` (fsspec, for plain Python I/O) or
:func:`arrow_filesystem` (pyarrow, for Ray Data readers/writers' ``filesystem=`` argument).
S3 goes through s3fs, which honours the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), so a MinIO/moto endpoint needs no code change.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import pyarrow.fs as pafs

__all__ = ["filesystem", "arrow_filesystem", "join", "to_uri", "is_remote", "ensure_parent",
           "exists", "remove", "open_write", "publish", "write_bytes_atomic"]

_S3_PROTOCOLS = ("s3", "s3a")


def _protocol(uri: str) -> str:
    """The scheme of ``uri`` (``"file"`` for plain paths)."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_remote(uri: str) -> bool:
    """True for URIs that are not on the local filesystem."""
    return _protocol(uri) not in ("file", "local")


def _require_s3fs() -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "s3:// paths need s3fs: `pip install s3fs` (or `pip install vlmray[s3]`)"
        ) from e


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or URI; ``path`` is native to ``fs``.

    Local paths come back absolute; ``s3://bucket/key`` comes back as ``bucket/key``.
    """
    if _protocol(uri) in _S3_PROTOCOLS:
        _require_s3fs()
    elif not is_remote(uri):
        uri = os.path.abspath(uri.split("://", 1)[-1])
    fs, path = fsspec.core.url_to_fs(uri)
    if is_remote(uri):
        # fsspec caches one instance per settings, with its directory listings; other processes
        # (Ray workers) write under the same prefixes, so a cached listing can be stale.
        fs.invalidate_cache()
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(pyarrow_fs, path)`` suitable for ``ray.data.read_*(paths, filesystem=...)``.

    Local paths use pyarrow's own ``LocalFileSystem``; anything else wraps the fsspec
    filesystem from :func:`filesystem` in ``PyFileSystem(FSSpecHandler(...))``.
    """
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/`` (keeps the ``s3://`` scheme)."""
    out = uri.rstrip("/") if uri not in ("/", "") else uri
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = f"{out}/{part}" if out and not out.endswith("/") else f"{out}{part}"
    return out


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def ensure_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the parent directory of ``path`` on local filesystems (object stores need none)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and _is_local(fs):
        fs.makedirs(parent, exist_ok=True)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`filesystem`: a path native to ``fs`` back to a URI (plain if local)."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def exists(uri: str) -> bool:
    """Whether a file or directory is at ``uri`` (local or s3://)."""
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Deletes the file or directory tree at ``uri`` if there is one (local or s3://)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def publish(staged: str, final: str) -> None:
    """Moves the finished tree at ``staged`` to ``final``, replacing what ``final`` held.

    Jobs that replace an output write the new one under a temporary prefix first and call
    this once it is complete, so the old output is never deleted before its replacement
    exists: locally the old tree is renamed aside, the new one renamed in (one rename on the
    same filesystem), then the old one removed; object stores have no rename, so the old
    objects are deleted and the new ones copied over (server-side), then the staged ones
    removed.
    """
    fs, src = filesystem(staged)
    _, dst = filesystem(final)
    if _is_local(fs):
        ensure_parent(fs, dst)
        aside = f"{dst}.old-{os.getpid()}"
        if os.path.lexists(dst):
            os.replace(dst, aside)
        os.replace(src, dst)
        if os.path.lexists(aside):
            fs.rm(aside, recursive=True)
        return
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    for path in sorted(fs.find(src)):
        fs.copy(path, dst + path[len(src.rstrip("/")):])
    fs.rm(src, recursive=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``uri`` whole or not at all: local files via a temp name and rename; object
    stores via one PUT (already atomic)."""
    fs, path = filesystem(uri)
    ensure_parent(fs, path)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def open_write(uri: str, mode: str = "w") -> Any:
    """Opens ``uri`` for writing (local or s3://), creating local parent directories."""
    fs, path = filesystem(uri)
    ensure_parent(fs, path)
    return fs.open(path, mode)
