"""Every row accounted for: per-stage counts (in, kept, dropped by reason, repaired by kind).

Rows carry ``reject_stage``/``reject_reason``/``repairs`` through the whole plan, so the counts
come from the final rows as they stream past, batch by batch, with no shared counters:

    counts += count_batch(batch)                   # per batch, in the stream (small rows)
    stats = stage_stats(["text", "image", "dedup"], counts, repair_stage)
    check_identity(rows_in, rows_out=..., rows_rejected=...)   # raises AccountingError
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, num_rows

ROWS, REJECT, REPAIR = "rows", "reject", "repair"
REJECT_COLUMNS = (schema.KEY, schema.TEXT, schema.URL, schema.SOURCE, schema.ROW_ID,
                  schema.REJECT_STAGE, schema.REJECT_REASON, schema.DUPLICATE_OF, schema.REPAIRS)
"""The columns of every ``rejects/`` file, the curation job's and training's alike: what a row
was (key, caption, URL, the input file it came from, its ``ROW_ID``), who rejected it and why
(stage, reason, the key it duplicates), and what was repaired before. ``ROW_ID`` is int64, the
rest str ("" where a row has no value)."""


class AccountingError(RuntimeError):
    """Rows went missing (or appeared): in != out + rejected."""


def count_batch(batch: Batch) -> Batch:
    """One batch -> rows of ``(kind, stage, name, n)`` counts."""
    counts: Counter[tuple[str, str, str]] = Counter()
    counts[(ROWS, "", "")] += num_rows(batch)
    reasons = batch.get(schema.REJECT_REASON)
    if reasons is not None:
        stages = batch[schema.REJECT_STAGE]
        for stage, reason in zip(stages[reasons != ""], reasons[reasons != ""]):
            counts[(REJECT, str(stage), str(reason))] += 1
    for rep in batch.get(schema.REPAIRS, ()):
        for kind in filter(None, str(rep).split(";")):
            counts[(REPAIR, "", kind)] += 1
    keys = list(counts)
    return {"kind": np.array([k[0] for k in keys], dtype=object),
            "stage": np.array([k[1] for k in keys], dtype=object),
            "name": np.array([k[2] for k in keys], dtype=object),
            "n": np.array([counts[k] for k in keys], dtype=np.int64)}


def stage_stats(stages: Sequence[str], counts: Mapping[tuple[str, str, str], int],
                repair_stage: Mapping[str, str]) -> dict[str, Any]:
    """``rows_in``, ``rows_out``, ``rows_rejected`` and, per stage in plan order, ``in``,
    ``kept``, ``dropped`` (by reason) and ``repaired`` (by kind)."""
    rows_in = int(counts.get((ROWS, "", ""), 0))
    unknown = sorted({s for k, s, _ in counts if k == REJECT and s not in stages})
    if unknown:
        raise AccountingError(f"rows rejected by stages {unknown} not in the plan {list(stages)}")
    remaining, out = rows_in, []
    for name in stages:
        dropped = {r: int(n) for (k, s, r), n in sorted(counts.items())
                   if k == REJECT and s == name}
        repaired = {r: int(n) for (k, _, r), n in sorted(counts.items())
                    if k == REPAIR and repair_stage.get(r) == name}
        kept = remaining - sum(dropped.values())
        out.append({"name": name, "in": remaining, "kept": kept, "dropped": dropped,
                    "repaired": repaired})
        remaining = kept
    rejected = rows_in - remaining
    return {"rows_in": rows_in, "rows_out": remaining, "rows_rejected": rejected, "stages": out,
            "reject_reasons": reason_totals(counts)}


def reason_totals(counts: Mapping[tuple[str, str, str], int]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for (kind, _, reason), n in counts.items():
        if kind == REJECT:
            totals[reason] += int(n)
    return dict(sorted(totals.items()))


def check_identity(rows_in: int, *, rows_out: int, rows_rejected: int, where: str = "") -> None:
    """Fails loudly unless ``rows_in == rows_out + rows_rejected``."""
    if rows_in != rows_out + rows_rejected:
        raise AccountingError(
            f"row accounting broke{f' in {where}' if where else ''}: {rows_in} rows in != "
            f"{rows_out} out + {rows_rejected} rejected ({rows_in - rows_out - rows_rejected:+d})")


__all__ = ["REJECT_COLUMNS", "AccountingError", "check_identity", "count_batch", "reason_totals",
           "stage_stats"]
