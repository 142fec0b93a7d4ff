"""Checkpoints: one directory holding ``state.pt`` (model, optimiser, scheduler, objective state,
data position, the caller's ``extra``), ``config.json`` (enough to rebuild the model for
evaluation), ``progress.json`` (the position alone, readable without loading) and
``manifest.json``, written last.

Two guarantees:

- **Loading never runs code.** ``state.pt`` holds only tensors and plain Python types (dicts,
  lists, tuples, sets, numbers, strings, ``torch.dtype``/``device``/``Size``) and is read with
  ``torch.load(weights_only=True)``: a pickle that names any other callable is refused
  (:class:`UnsafeCheckpointError`) before anything of it runs. :func:`save_checkpoint` converts
  what would not load so (numpy arrays and scalars, dataclasses) and refuses anything else,
  so a checkpoint that saves always loads (``vlmray.train.plain``).
- **A torn checkpoint is never used.** The manifest records the size and sha256 of the other
  three files. :func:`find_latest` returns the newest checkpoint whose files match it, and
  prints each newer one it skipped and why (a copy cut short by a crash, on local disk or NFS);
  :func:`load_checkpoint` checks the files it reads against it before loading anything
  (:class:`IncompleteCheckpointError`). On an object store (``s3://``), where an object is
  written whole or not at all, :func:`find_latest` compares sizes and presence only (hashing
  would read every checkpoint it considers once more) and the sha256 is checked on load.

Checkpoints written before the manifest existed are **unverified but usable**: accepted when
``progress.json`` and ``config.json`` parse and ``state.pt`` is a complete zip archive whose every
member matches the CRC-32 ``torch.save`` recorded for it (a cut-short or zero-filled copy fails
this); they load if they hold only plain types, and otherwise fail with a message that says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmray.data.storage import filesystem, is_remote, join, to_uri, write_bytes_atomic
from vlmray.train.plain import pack_numpy, plain_state, unpack_numpy

STATE = "state.pt"
CONFIG = "config.json"
PROGRESS = "progress.json"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, cut short or do not match its manifest: another,
    older checkpoint may be used instead."""


class UnsafeCheckpointError(CheckpointError):
    """A ``state.pt`` that holds objects other than tensors and plain types: refused unread."""


@dataclass
class SourcePosition:
    """Where one training source's stream stands: its epoch, and batches of that epoch
    already trained on."""

    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Progress:
    """Where training stands: optimiser steps done, and the position in the data stream.

    One stream (``data.sampling="mixed"``): ``epoch`` and ``batch_in_epoch``, ``sources``
    empty. Several streams (``"single_source"``): ``sources[k]`` is source k's position, and
    ``epoch`` / ``batch_in_epoch`` mirror the source the last step drew from (informational).
    Checkpoints written before ``sources`` existed load with it empty."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    sources: list[SourcePosition] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        d = dict(d)
        sources = [SourcePosition(**s) for s in d.pop("sources", [])]
        return cls(**d, sources=sources)

    def positions(self, n: int) -> list[SourcePosition]:
        """The n sources' positions, created on first use: source 0 continues a single-stream
        position (a checkpoint of a one-source run), the others start at the beginning. A
        different, non-zero number of recorded sources is an error (the sources changed)."""
        if not self.sources:
            self.sources = [SourcePosition(self.epoch, self.batch_in_epoch)]
            self.sources += [SourcePosition() for _ in range(n - 1)]
        if len(self.sources) != n:
            raise ValueError(f"the checkpoint records {len(self.sources)} data sources' "
                             f"positions but this run has {n}: resume with the same sources")
        return self.sources


# --- saving -----------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, config: dict,
                    objectives: nn.Module | None = None, extra: dict | None = None) -> Path:
    """Writes the checkpoint directory ``path`` (local); the manifest goes last, atomically.
    ``objectives``: the objective mix, whose state (e.g. DeCLIP's feature queue) is saved
    when it has any. ``extra``: any other state (RNG states, a data cursor), nested dicts,
    lists and tuples of tensors, plain types and numpy arrays and scalars; numpy arrays load
    back as numpy arrays (``load_checkpoint(extra=...)``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "progress": asdict(progress)}
    if objectives is not None and objectives.state_dict():
        state["objectives"] = objectives.state_dict()
    if extra is not None:
        state["extra"] = pack_numpy(dict(extra))
    files = {STATE: _save_hashed(plain_state(state), path / STATE)}
    for name, doc in ((CONFIG, json.dumps(config, indent=1)),
                      (PROGRESS, json.dumps(asdict(progress)))):
        data = doc.encode()
        (path / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"version": MANIFEST_VERSION, "step": progress.step, "files": files}
    write_bytes_atomic(str(path / MANIFEST), json.dumps(manifest, indent=1).encode())
    return path


class _HashingWriter:
    """A file that hashes what is written to it (``torch.save`` writes through ``write``)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_hashed(state: dict, file: Path) -> dict[str, Any]:
    with open(file, "wb") as f:
        w = _HashingWriter(f)
        torch.save(state, w)
    return {"size": w.size, "sha256": w.sha.hexdigest()}


# --- loading ----------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    objectives: nn.Module | None = None,
                    extra: dict | None = None) -> Progress:
    """Restores what is given in place from the checkpoint at ``path`` (a local directory or a
    URI, copied to a temporary directory first); returns the saved progress. Its files are
    checked against the manifest before anything is loaded (:class:`IncompleteCheckpointError`)
    and ``state.pt`` is read with ``weights_only=True`` (:class:`UnsafeCheckpointError`).
    ``extra``: a dict updated with the ``extra`` saved (nothing for a checkpoint without)."""
    with local_copy(path) as d:
        fs, base = filesystem(str(d))
        problem = _problem(fs, base, contents=True)
        if problem:
            raise IncompleteCheckpointError(f"checkpoint {path}: {problem}")
        state = _load_state(Path(d) / STATE, shown=path)
    model.load_state_dict(state["model"])
    if objectives is not None and "objectives" in state:
        objectives.load_state_dict(state["objectives"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if extra is not None:
        extra.update(unpack_numpy(state.get("extra", {})))
    return Progress.from_dict(state["progress"])


def _load_state(file: Path, shown: str | Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line),
                      reason[0] if reason else "")
        raise UnsafeCheckpointError(
            f"checkpoint {shown}: refused to load {STATE}: it holds objects other than tensors "
            f"and plain types, which vlmray checkpoints never contain and which could run code "
            f"when unpickled ({detail.strip()}). If it is an old checkpoint you wrote yourself "
            f"and trust, load it once with torch.load(weights_only=False) and save its "
            f"contents again as tensors and plain types.") from None


@contextlib.contextmanager
def local_copy(path: str | Path) -> Iterator[str]:
    """The checkpoint directory ``path`` itself when local; else its files copied to a
    temporary directory (removed afterwards)."""
    if not is_remote(str(path)):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="vlmray-ckpt-") as local:
        for name in (STATE, CONFIG, PROGRESS, MANIFEST):
            fs, remote = filesystem(join(str(path), name))
            if fs.exists(remote):
                fs.get_file(remote, os.path.join(local, name))
        yield local


def read_config(path: str | Path) -> dict:
    """The ``config.json`` of the checkpoint at ``path`` (a local directory or a URI)."""
    fs, p = filesystem(join(str(path), CONFIG))
    return json.loads(fs.cat_file(p))


# --- finding and checking ---------------------------------------------------------------------


def find_latest(root: str | Path) -> Path | str | None:
    """The newest intact checkpoint directory under ``root`` (itself included), or None.

    ``root`` is a local path or a URI (``s3://bucket/run/ray``). A directory holding
    ``progress.json`` or ``manifest.json`` is a candidate; candidates are checked newest step
    first (see the module docstring) and each one skipped is printed with the reason (Ray Train
    copies a reported checkpoint into storage file by file, so a reader may also meet one
    half-written). Returns a ``Path`` for a local root (absolute) and a URI string for a
    remote one.
    """
    fs, base = filesystem(str(root))
    contents = not is_remote(str(root))
    names = (PROGRESS, MANIFEST)
    dirs = sorted({f.rsplit("/", 1)[0] for f in fs.find(base) if f.rsplit("/", 1)[-1] in names})
    steps = {d: _step(fs, d) for d in dirs}
    for d in (d for d in dirs if steps[d] is None):
        print(f"[vlmray] checkpoint {to_uri(fs, d)} skipped: neither {MANIFEST} nor {PROGRESS} "
              f"is readable (still being copied, or cut short)", flush=True)
    for d in sorted((d for d in dirs if steps[d] is not None), key=lambda d: -steps[d]):
        problem = _problem(fs, d, contents=contents)
        if problem is None:
            return to_uri(fs, d) if is_remote(str(root)) else Path(d)
        print(f"[vlmray] checkpoint {to_uri(fs, d)} (step {steps[d]}) skipped: {problem}",
              flush=True)
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` (local or URI) cannot be used, or None when it can: its
    files against its manifest, sizes and sha256 (or, without a manifest, the checks of the
    module docstring)."""
    fs, base = filesystem(str(path))
    return _problem(fs, base, contents=True)


def _step(fs: Any, d: str) -> int | None:
    """The step of checkpoint directory ``d``: its manifest's, else its progress.json's."""
    for name in (MANIFEST, PROGRESS):
        try:
            return int(json.loads(fs.cat_file(join(d, name)))["step"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return None


def _read_manifest(fs: Any, d: str) -> dict | None:
    """The manifest of ``d``; None when there is none; raises when it is unreadable."""
    try:
        raw = fs.cat_file(join(d, MANIFEST))
    except FileNotFoundError:
        return None
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise TypeError("no 'files' record")
    return doc


def _problem(fs: Any, d: str, *, contents: bool) -> str | None:
    """Why the checkpoint in ``d`` cannot be used, or None. ``contents``: hash the files (else
    compare sizes only)."""
    try:
        manifest = _read_manifest(fs, d)
    except (ValueError, TypeError, OSError) as e:
        return f"{MANIFEST} is unreadable ({e}); cut short while being copied?"
    if manifest is None:
        return _legacy_problem(fs, d, contents=contents)
    for name in (STATE, CONFIG, PROGRESS):
        rec = manifest["files"].get(name)
        if not isinstance(rec, dict) or "size" not in rec or "sha256" not in rec:
            return f"{MANIFEST} does not record {name}"
        if problem := _file_problem(fs, join(d, name), name, rec, contents=contents):
            return problem
    return None


def _file_problem(fs: Any, path: str, name: str, rec: dict, *, contents: bool) -> str | None:
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return f"{name} is missing"
    if size != rec["size"]:
        return (f"{name} is {size} bytes but {MANIFEST} records {rec['size']} (cut short while "
                f"being written or copied)")
    if contents and _sha256(fs, path) != rec["sha256"]:
        return f"{name} does not match the sha256 in {MANIFEST} (damaged or altered)"
    return None


def _sha256(fs: Any, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _legacy_problem(fs: Any, d: str, *, contents: bool) -> str | None:
    """A checkpoint without a manifest (written before manifests existed): its JSON files
    parse, and ``state.pt`` is a whole zip archive (every member's CRC-32 when ``contents``)."""
    for name in (PROGRESS, CONFIG):
        try:
            json.loads(fs.cat_file(join(d, name)))
        except FileNotFoundError:
            return f"no {MANIFEST}, and {name} is missing"
        except (ValueError, OSError) as e:
            return f"no {MANIFEST}, and {name} is empty or unreadable ({e})"
    try:
        with fs.open(join(d, STATE), "rb") as f, zipfile.ZipFile(f) as z:
            bad = z.testzip() if contents else None
    except FileNotFoundError:
        return f"no {MANIFEST}, and {STATE} is missing"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"no {MANIFEST}, and {STATE} is not a complete zip archive ({e})"
    if bad is not None:
        return f"no {MANIFEST}, and {STATE} is damaged (member {bad} fails its CRC-32)"
    return None


__all__ = ["CONFIG", "MANIFEST", "PROGRESS", "STATE", "CheckpointError",
           "IncompleteCheckpointError", "Progress", "SourcePosition", "UnsafeCheckpointError",
           "find_latest", "load_checkpoint", "local_copy", "plain_state", "read_config",
           "save_checkpoint", "verify_checkpoint"]
