"""Image paths in tables are read only from where the user said: a relative path stays inside
its table's folder, absolute paths and URIs need ``read.allow_absolute_paths``, web URLs are
never fetched here (the downloader fetches them, with its checks), only regular files are
read, and never more than ``read.max_bytes``. Each refusal is a reject reason of the ``read``
stage.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vlmray.config.inputs import ReadConfig
from vlmray.data.storage import filesystem, is_remote, join

IMAGE_PATH_OUTSIDE_INPUT = "image_path_outside_input"

URL_BELONGS_IN_URL_COLUMN = "url_belongs_in_url_column"

IMAGE_PATH_NOT_A_FILE = "image_path_not_a_file"

FILE_TOO_LARGE = "file_too_large"

_WEB_SCHEMES = frozenset({"http", "https", "ftp", "ftps"})

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _read_blob(uri: str, max_bytes: int) -> tuple[bytes | None, str]:
    """``(bytes, "")``, ``(None, "")`` when missing, or ``(None, reason)``: never more than
    ``max_bytes + 1`` bytes are read, and a local path must be a regular file (``/dev/zero``
    or a FIFO would never end)."""
    fs, path = filesystem(uri)
    try:
        if not is_remote(uri):
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return None, IMAGE_PATH_NOT_A_FILE
            if st.st_size > max_bytes:
                return None, FILE_TOO_LARGE
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, ""
    return (None, FILE_TOO_LARGE) if len(data) > max_bytes else (data, "")


def _image_uri(p: str, base: str, cfg: ReadConfig) -> tuple[str, str]:
    """``(what to read, "")`` for an image path from a table, or ``("", reason)``. Relative
    paths stay inside ``base`` (the table's folder); absolute paths and URIs only with
    ``read.allow_absolute_paths``; web URLs never (the downloader fetches those, with its
    checks); fsspec chains (``a::b``) never."""
    if any(m.lower() in _WEB_SCHEMES for m in _SCHEME.findall(p)):
        return "", URL_BELONGS_IN_URL_COLUMN
    if "::" in p:
        return "", IMAGE_PATH_OUTSIDE_INPUT
    if "://" in p or posixpath.isabs(p):
        return (p, "") if cfg.allow_absolute_paths else ("", IMAGE_PATH_OUTSIDE_INPUT)
    rel = posixpath.normpath(p)
    if rel == ".." or rel.startswith("../"):
        return "", IMAGE_PATH_OUTSIDE_INPUT
    return join(base, rel), ""


def read_images(values: list[Any], paths: list[Any], base: str,
            cfg: ReadConfig) -> tuple[list[bytes | None], list[str]]:
    """Image bytes per row (inline bytes, an HF-style ``{bytes, path}`` struct, or a path read
    under :func:`_image_uri`'s rules and ``read.max_bytes``), and a read reject reason each."""
    out: list[bytes | None] = [None] * len(values)
    reasons = [""] * len(values)
    to_read: dict[int, str] = {}
    for i, (value, p) in enumerate(zip(values, paths)):
        if isinstance(value, dict):
            value, p = value.get("bytes"), p or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            out[i] = bytes(value)
            continue
        p = str(value if isinstance(value, str) and value else p or "")   # str image: a path
        if p:
            uri, reasons[i] = _image_uri(p.strip(), base, cfg)
            if uri:
                to_read[i] = uri
    if to_read:
        with ThreadPoolExecutor(8 if is_remote(base) else 1) as pool:
            read = pool.map(lambda u: _read_blob(u, cfg.max_bytes), to_read.values())
            for i, (data, reason) in zip(to_read, read):
                out[i], reasons[i] = data, reason
    return out, reasons


__all__ = ["FILE_TOO_LARGE", "IMAGE_PATH_NOT_A_FILE", "IMAGE_PATH_OUTSIDE_INPUT",
           "URL_BELONGS_IN_URL_COLUMN", "read_images"]
