"""Per-step metrics written by the main worker to ``<run_dir>/history.jsonl`` (local or s3://).

The whole file is rewritten on each log (it is small), so object stores work too; after a
restore, entries past the restored step are dropped so no step is counted twice.
"""

from __future__ import annotations

import json
import math
from typing import Any

from vlmray.data.storage import filesystem, join, open_write

HISTORY = "history.jsonl"


def read_history(run_dir: str) -> list[dict[str, Any]]:
    fs, path = filesystem(join(run_dir, HISTORY))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


class History:
    def __init__(self, run_dir: str, *, enabled: bool, resume_step: int = 0) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.rows = [r for r in read_history(run_dir) if r["step"] <= resume_step] if enabled else []

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
        self.rows.append(row)
        _print_progress(row)
        with open_write(join(self.run_dir, HISTORY)) as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.rows))


def _print_progress(row: dict[str, Any]) -> None:
    keys = ("loss", "lr", "samples_per_s", "temperature", "zero_shot_top1", "retrieval_i2t_r1")
    shown = " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)
    print(f"[vlmray] step {row.get('step')} epoch {row.get('epoch')} {shown}", flush=True)


__all__ = ["HISTORY", "History", "read_history"]
