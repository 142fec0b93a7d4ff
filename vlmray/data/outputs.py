"""Where a job may write: never over what it reads, never over files it did not write.

Every job (curate, rewrite, index, pretrain, make_data) checks its output before any work,
so a mistyped ``--output`` fails with a :class:`~vlmray.config.ConfigError` instead of deleting
data: :func:`check_output` refuses an output that is an input, lies inside one or contains one,
and an existing folder holding files this kind of job did not write (another job's output, a
stray shard, an unknown run). A job then claims its folder with :func:`claim_output`, which
writes ``_job.json`` (``{"job": kind, ...}``) before anything else, so a re-run of the same kind
of job (a resume) is recognised and every other job keeps out.

    check_output("s3://cur/v1", ["s3://raw/part-*.tar"], job="curate")
    claim_output("s3://cur/v1", "curate", fingerprint=fp)
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable
from typing import Any

from vlmray.config import ConfigError
from vlmray.data.storage import filesystem, is_remote, join, write_bytes_atomic

JOB_FILE = "_job.json"
_IGNORED = ("lost+found",)             # a fresh volume's folder: not anyone's output
_GLOB = "*?["

__all__ = ["JOB_FILE", "check_apart", "check_output", "check_owner", "claim_output", "job_of"]


def _location(uri: str) -> tuple[str, str]:
    """(scheme, absolute path without a trailing ``/``) of the folder or file ``uri`` names;
    a glob names the folder it lists. Local paths resolve symlinks, so a link to the input is
    the input."""
    head = uri.strip()
    cut = min((head.index(c) for c in _GLOB if c in head), default=-1)
    if cut >= 0:
        head = posixpath.dirname(head[:cut]) or "."
    scheme = head.split("://", 1)[0].lower() if "://" in head else "file"
    if not is_remote(head):
        return "file", os.path.realpath(os.path.abspath(head.split("://", 1)[-1]))
    return ("s3" if scheme == "s3a" else scheme), head.split("://", 1)[1].rstrip("/") or "/"


def _within(path: str, folder: str) -> bool:
    return path == folder or folder == "/" or path.startswith(folder.rstrip("/") + "/")


def check_apart(output: str, inputs: Iterable[str]) -> None:
    """ConfigError when ``output`` is, lies inside or contains one of ``inputs`` (empty
    entries are skipped; callers leave out generated inputs such as ``builtin``)."""
    scheme, out = _location(output)
    for uri in inputs:
        if not uri:
            continue
        in_scheme, path = _location(uri)
        if in_scheme != scheme:
            continue
        how = ("is" if out == path else "is inside" if _within(out, path)
               else "contains" if _within(path, out) else "")
        if how:
            raise ConfigError(f"--output {output!r} {how} the input {uri!r}: the job would "
                              "write over, or delete, what it reads; choose an --output apart "
                              "from every input")


def job_of(output: str) -> str:
    """The kind of job that claimed ``output`` (its ``_job.json``); curation outputs written
    before jobs named themselves count as ``curate``."""
    fs, path = filesystem(join(output, JOB_FILE))
    try:
        doc = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return "unknown"
    return str(doc.get("job", "curate")) if isinstance(doc, dict) else "unknown"


def _entries(output: str) -> list[str] | None:
    """Names in the folder ``output`` (hidden ones and ``lost+found`` left out); None when
    there is no folder."""
    fs, path = filesystem(output)
    if not fs.isdir(path):
        if fs.exists(path):
            raise ConfigError(f"--output {output!r} is a file; name a folder")
        return None
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    return sorted(n for n in names if n and not n.startswith(".") and n not in _IGNORED)


def check_owner(output: str, job: str, markers: tuple[str, ...] = ()) -> None:
    """ConfigError unless ``output`` is new, empty, claimed by a ``job`` job, or holds one of
    ``markers`` (files only this kind of job writes, e.g. a training run's ``config.json``)."""
    names = _entries(output)
    if not names:
        return
    if JOB_FILE in names:
        owner = job_of(output)
        if owner != job:
            raise ConfigError(f"--output {output!r} holds a {owner} job's output; a {job} job "
                              "writes only into a new or empty folder, or its own earlier "
                              "output: choose another --output")
        return
    if any(m in names for m in markers):
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ConfigError(f"--output {output!r} already holds files no {job} job wrote ({shown}) "
                      f"and no {JOB_FILE}: another job's or an unknown run's, which this job "
                      "could overwrite or delete; choose a new or empty --output")


def check_output(output: str, inputs: Iterable[str], *, job: str,
                 markers: tuple[str, ...] = ()) -> None:
    """Both checks, before any work: :func:`check_apart` and :func:`check_owner`."""
    check_apart(output, inputs)
    check_owner(output, job, markers)


def claim_output(output: str, job: str, **fields: Any) -> None:
    """Writes ``<output>/_job.json`` naming the ``job`` (plus ``fields``): call it after
    :func:`check_output` and before writing anything else."""
    doc = {"job": job, **fields}
    write_bytes_atomic(join(output, JOB_FILE),
                       json.dumps(doc, indent=2, sort_keys=True).encode())
