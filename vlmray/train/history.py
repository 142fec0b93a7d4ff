"""Per-step metrics written by the main worker to ``<run_dir>/history.jsonl`` (local or s3://),
and the run's attempts in ``<run_dir>/events.jsonl``.

The whole file is rewritten on each log (it is small), so object stores work too; after a
restore, entries past the restored step are dropped so no step is counted twice. Each row
carries ``time`` (Unix seconds when it was logged) and, from the training loop,
``skipped_steps``: the steps so far whose update was skipped for a non-finite loss or gradient.

``events.jsonl`` gets one row per worker-group start (``event="start"``, the step it restored
to, and from where) and per injected fault (``event="fault"``), so a driver can count restarts
and time recoveries.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from vlmray.data.storage import filesystem, is_remote, join, open_write

HISTORY = "history.jsonl"
EVENTS = "events.jsonl"


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(uri: str, rows: list[dict[str, Any]]) -> None:
    """Replaces ``uri`` with ``rows``: an object store's PUT is atomic; a local file is written
    beside and renamed over, so a worker killed mid-write never leaves a torn file behind."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if is_remote(uri):
        with open_write(uri) as f:
            f.write(text)
        return
    path = filesystem(uri)[1]
    with open_write(f"{path}.tmp") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def read_history(run_dir: str) -> list[dict[str, Any]]:
    return _read_jsonl(join(run_dir, HISTORY))


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """The rows of ``events.jsonl`` in the order they were logged ([] when there is none)."""
    return _read_jsonl(join(run_dir, EVENTS))


def log_event(run_dir: str, event: str, **fields: Any) -> dict[str, Any]:
    """Appends ``{"event": event, "time": now, **fields}`` to ``events.jsonl`` (rewriting it, so
    object stores work); call from the main worker only. Returns the row."""
    row = {"event": event, "time": time.time(), **fields}
    _write_jsonl(join(run_dir, EVENTS), [*read_events(run_dir), row])
    return row


class History:
    def __init__(self, run_dir: str, *, enabled: bool, resume_step: int = 0) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.rows = [r for r in read_history(run_dir) if r["step"] <= resume_step] if enabled else []

    def last(self, key: str, default: Any = None) -> Any:
        """``key`` of the newest row that has it (a resumed run continues its counts), else
        ``default``."""
        return next((r[key] for r in reversed(self.rows) if key in r), default)

    def log(self, metrics: dict[str, Any]) -> None:
        """Appends a row of ``metrics``' finite numbers: a skipped step's NaN loss is left out
        (JSON has no NaN), and its ``skipped_steps`` says so."""
        if not self.enabled:
            return
        row = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
        row.setdefault("time", time.time())
        self.rows.append(row)
        _print_progress(row)
        _write_jsonl(join(self.run_dir, HISTORY), self.rows)


def _print_progress(row: dict[str, Any]) -> None:
    keys = ("loss", "lr", "samples_per_s", "temperature", "zero_shot_top1", "retrieval_i2t_r1")
    shown = " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)
    print(f"[vlmray] step {row.get('step')} epoch {row.get('epoch')} {shown}", flush=True)


__all__ = ["EVENTS", "HISTORY", "History", "log_event", "read_events", "read_history"]
