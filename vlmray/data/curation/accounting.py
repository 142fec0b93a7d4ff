"""Every row accounted for: per-stage counts (in, kept, dropped by reason, repaired by kind).

Rows carry ``reject_stage``/``reject_reason``/``repairs`` through the whole plan, so the counts
come from one cheap pass over the final rows, with no shared counters:

    counts = tally(final_ds)                       # Ray Data map + small take_all
    stats = stage_stats(["text", "image", "dedup"], counts, repair_stage)
    check_identity(rows_in, rows_out=..., rows_rejected=...)   # raises AccountingError
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, num_rows

if TYPE_CHECKING:
    import ray.data

ROWS, REJECT, REPAIR = "rows", "reject", "repair"


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


def merge_counts(rows: Sequence[Mapping[str, Any]]) -> Counter[tuple[str, str, str]]:
    total: Counter[tuple[str, str, str]] = Counter()
    for row in rows:
        total[(str(row["kind"]), str(row["stage"]), str(row["name"]))] += int(row["n"])
    return total


def tally(ds: ray.data.Dataset) -> Counter[tuple[str, str, str]]:
    """Counts over a whole dataset (a map per block; only the small counts reach the driver)."""
    cols = [c for c in (schema.REJECT_REASON, schema.REJECT_STAGE, schema.REPAIRS)
            if c in ds.columns()]
    small = ds.select_columns(cols).map_batches(count_batch, batch_format="numpy",
                                                batch_size=4096)
    return merge_counts(small.take_all())


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


def _noise_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per batch: rows and rejected rows per noise kind recorded in the sidecar."""
    counts: dict[str, list[int]] = {}
    for meta, reason in zip(batch[schema.META], batch[schema.REJECT_REASON]):
        try:
            doc = json.loads(meta or "{}")
        except (TypeError, ValueError):
            continue
        if isinstance(doc, dict) and "noise" in doc:
            entry = counts.setdefault(doc["noise"] or "clean", [0, 0])
            entry[0] += 1
            entry[1] += int(reason != "")
    kinds = sorted(counts)
    return {"noise": np.asarray(kinds, dtype=object),
            "rows": np.asarray([counts[k][0] for k in kinds], dtype=np.int64),
            "rejected": np.asarray([counts[k][1] for k in kinds], dtype=np.int64)}


def noise_report(final: ray.data.Dataset) -> dict[str, dict[str, int]]:
    """Rows and rejected rows per injected noise kind, for inputs whose sidecars record one
    (the built-in data's ground truth); empty otherwise."""
    report: dict[str, dict[str, int]] = {}
    small = final.select_columns([schema.META, schema.REJECT_REASON]).map_batches(
        _noise_counts, batch_format="numpy", batch_size=4096)
    for row in small.take_all():
        entry = report.setdefault(str(row["noise"]), {"rows": 0, "rejected": 0})
        entry["rows"] += int(row["rows"])
        entry["rejected"] += int(row["rejected"])
    return dict(sorted(report.items()))


__all__ = ["AccountingError", "check_identity", "count_batch", "merge_counts", "noise_report",
           "reason_totals", "stage_stats", "tally"]
