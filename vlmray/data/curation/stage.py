"""The stage contract of curation: small row-level steps and whole-dataset decisions.

A :class:`Stage` is one row-level step (decode+validate images, clean text, score...). It
declares its resources, does its heavy set-up once per worker in :meth:`Stage.setup`, and
processes a NumPy batch of *live* rows in :meth:`Stage.process`. The base class keeps the
bookkeeping: rows rejected by an earlier stage pass through untouched, and a row this stage
rejects gets ``reject_reason`` and ``reject_stage`` and its image bytes dropped (the reason and
key stay, so nothing is lost). Repairs (e.g. ``exif_rotated``) are appended to ``repairs``.

A :class:`GlobalStage` needs the whole dataset at once (deduplication, keep-top-fraction): it
reads a few small columns of all live rows and returns :class:`Decisions`, which
:class:`vlmray.data.curation.twopass.FileDecisions` marks on the rows, one input file at a
time.

    ds = apply_stage(ds, TextStage(cfg.text))          # a Ray Data map_batches
    batch = TextStage(cfg.text)(batch)                 # or plain Python on a NumPy batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from vlmray.config.data import PlacementConfig
from vlmray.data import schema
from vlmray.data.curation.blocks import column_types, to_block, to_numpy
from vlmray.data.placement import remote_args

if TYPE_CHECKING:
    import ray.data

Batch = dict[str, np.ndarray]
BOOKKEEPING = (schema.REJECT_REASON, schema.REJECT_STAGE, schema.REPAIRS)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one worker of a stage reserves, and how Ray Data runs it."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 0
    """> 0: an actor pool of this size (``setup`` once per actor); 0: stateless tasks."""
    batch_size: int | None = 64
    """Rows per batch; None = whole blocks (lets Ray Data fuse the stage with the read)."""
    model: bool = False
    """The stage holds a model (scoring, embedding, LLM): it is placed by
    ``PlacementConfig.model_resources`` rather than ``resources``."""


@dataclass
class StageOutput:
    """What :meth:`Stage.process` returns for its live rows (all arrays have their length)."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    """New or replaced columns."""
    reasons: np.ndarray | None = None
    """Reject reason per row, ``""`` = kept; None = all kept."""
    repairs: np.ndarray | None = None
    """Repairs per row, ``";"``-joined, ``""`` = none; None = none."""


def filled(value: Any, n: int) -> np.ndarray:
    """An ``n``-row column holding ``value``, typed as the value is."""
    if isinstance(value, bool):
        return np.full(n, value, dtype=bool)
    if isinstance(value, int):
        return np.full(n, value, dtype=np.int64)
    if isinstance(value, float):
        return np.full(n, value, dtype=np.float64)
    out = np.empty(n, dtype=object)
    out[:] = [value] * n
    return out


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def with_bookkeeping(batch: Batch) -> Batch:
    """A shallow copy of ``batch`` with the reject/repair columns present."""
    batch = dict(batch)
    n = num_rows(batch)
    for col in BOOKKEEPING:
        if col not in batch:
            batch[col] = filled("", n)
        else:
            batch[col] = np.asarray(batch[col], dtype=object).copy()
    return batch


class Stage:
    """One row-level curation step. Subclasses set the class variables and :meth:`process`."""

    name: ClassVar[str] = "stage"
    reasons: ClassVar[tuple[str, ...]] = ()
    """Every reject reason this stage can give."""
    repair_kinds: ClassVar[tuple[str, ...]] = ()
    """Every repair this stage can apply."""
    fills: ClassVar[dict[str, Any]] = {}
    """New columns this stage adds -> their value on rows it does not process."""
    str_columns: ClassVar[tuple[str, ...]] = ()
    """Columns this stage leaves as ``str`` (or None) on EVERY row, so all blocks agree on the
    Arrow type (e.g. the text stage decodes captions it skipped with replacement)."""
    resources: Resources = Resources()

    _ready: bool = False

    def setup(self) -> None:
        """Heavy state (models, clients), once per worker process or actor."""

    def process(self, batch: Batch) -> StageOutput:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            self.setup()
            self._ready = True
        batch = with_bookkeeping(batch)
        n = num_rows(batch)
        live = np.flatnonzero(batch[schema.REJECT_REASON] == "")
        out = self.process({k: v[live] for k, v in batch.items()}) if len(live) else StageOutput()
        for col, fill in self.fills.items():
            if col not in batch and col not in out.columns:
                batch[col] = filled(fill, n)
        for col, values in out.columns.items():
            values = np.asarray(values) if not isinstance(values, np.ndarray) else values
            if col in batch:
                full = batch[col].copy()
                if full.dtype != values.dtype and values.dtype == object:
                    full = full.astype(object)
            elif values.ndim > 1:              # a tensor column: rows not processed are zeros
                full = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
            else:
                full = filled(self.fills.get(col, _default_fill(values)), n)
                if full.dtype != values.dtype:
                    full = full.astype(values.dtype)
            full[live] = values
            batch[col] = _same_kind(full, values)
        for col in self.str_columns:
            if col in batch:
                batch[col] = as_str_column(batch[col])
        if out.repairs is not None:
            _append_repairs(batch[schema.REPAIRS], live, out.repairs)
        if out.reasons is not None:
            mark_rejected(batch, live, np.asarray(out.reasons, dtype=object), self.name)
        return batch

    def on_block(self, block: pa.Table) -> pa.Table:
        """:meth:`__call__` on an Arrow block, as Ray Data runs the stage
        (:func:`apply_stage`): a column keeps one Arrow type in every block it emits, also
        where a block's values are all None (:mod:`vlmray.data.curation.blocks`)."""
        types = column_types(block.schema, self.str_columns)
        return to_block(self(to_numpy(block)), types)


def as_str_column(values: np.ndarray) -> np.ndarray:
    """Object column with bytes decoded as UTF-8 (with replacement); None stays None."""
    out = np.asarray(values, dtype=object).copy()
    for i, v in enumerate(out):
        if isinstance(v, (bytes, bytearray)):
            out[i] = bytes(v).decode("utf-8", errors="replace")
        elif v is not None and not isinstance(v, str):
            out[i] = str(v)
    return out


def _same_kind(full: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Arrow needs one type per column: when a stage turns bytes into str (or the reverse) on
    its live rows, convert the rows it skipped the same way."""
    if full.dtype != object or not len(values):
        return full
    if all(isinstance(v, str) for v in values):
        for i, v in enumerate(full):
            if isinstance(v, (bytes, bytearray)):
                full[i] = bytes(v).decode("utf-8", errors="replace")
    elif all(isinstance(v, (bytes, bytearray)) for v in values):
        for i, v in enumerate(full):
            if isinstance(v, str):
                full[i] = v.encode("utf-8")
    return full


def _default_fill(values: np.ndarray) -> Any:
    if values.dtype.kind in "iu":
        return 0
    if values.dtype.kind == "f":
        return float("nan")
    if values.dtype.kind == "b":
        return False
    return None


def _append_repairs(column: np.ndarray, rows: np.ndarray, repairs: np.ndarray) -> None:
    for i, rep in zip(rows, repairs):
        if rep:
            column[i] = f"{column[i]};{rep}" if column[i] else rep


def mark_rejected(batch: Batch, rows: np.ndarray, reasons: np.ndarray, stage: str) -> None:
    """Set reason/stage on ``rows`` whose ``reasons`` entry is non-empty; drop their image."""
    hit = reasons != ""
    idx = rows[hit]
    batch[schema.REJECT_REASON][idx] = reasons[hit]
    batch[schema.REJECT_STAGE][idx] = stage
    if schema.IMAGE in batch and len(idx):
        image = batch[schema.IMAGE].astype(object)
        image[idx] = b""
        batch[schema.IMAGE] = image


class StageActor:
    """Runs a stage in a Ray actor: ``setup`` in the constructor, once per actor; Arrow
    blocks in and out (:meth:`Stage.on_block`)."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        stage.setup()
        stage._ready = True

    def __call__(self, block: pa.Table) -> pa.Table:
        return self.stage.on_block(block)


def apply_stage(ds: ray.data.Dataset, stage: Stage,
                placement: PlacementConfig | None = None) -> ray.data.Dataset:
    """Add ``stage`` to a Ray Data plan, with its declared resources and the custom resources
    ``placement`` gives data (or, for model stages, model) stages. It runs on Arrow blocks
    (:meth:`Stage.on_block`), so every column keeps one Arrow type across blocks."""
    r = stage.resources
    kwargs: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": r.batch_size,
                              **remote_args(placement, r.num_cpus, model=r.model)}
    if r.num_gpus:
        kwargs["num_gpus"] = r.num_gpus
    if r.actors:
        return ds.map_batches(StageActor, fn_constructor_args=(stage,), concurrency=r.actors,
                              **kwargs)
    return ds.map_batches(stage.on_block, **kwargs)   # "MapBatches(<Stage>.on_block)"


# --- whole-dataset decisions -----------------------------------------------------------------


@dataclass
class Decisions:
    """Rows to reject, by ``row_id``, with a reason each (and what they duplicate, if any)."""

    row_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    duplicate_of: np.ndarray | None = None

    def __post_init__(self) -> None:
        order = np.argsort(self.row_ids, kind="stable")
        self.row_ids = np.asarray(self.row_ids, dtype=np.int64)[order]
        self.reasons = np.asarray(self.reasons, dtype=object)[order]
        if self.duplicate_of is not None:
            self.duplicate_of = np.asarray(self.duplicate_of, dtype=object)[order]

    def __len__(self) -> int:
        return len(self.row_ids)

    def counts(self) -> dict[str, int]:
        names, n = np.unique(self.reasons.astype(str), return_counts=True)
        return {str(k): int(v) for k, v in zip(names, n)}

    def lookup(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``row_ids``: (reason or "", duplicate_of or "")."""
        pos = np.searchsorted(self.row_ids, row_ids)
        pos = np.minimum(pos, max(len(self.row_ids) - 1, 0))
        hit = (self.row_ids[pos] == row_ids) if len(self.row_ids) else np.zeros(len(row_ids), bool)
        reasons = filled("", len(row_ids))
        dups = filled("", len(row_ids))
        reasons[hit] = self.reasons[pos[hit]]
        if self.duplicate_of is not None:
            dups[hit] = self.duplicate_of[pos[hit]]
        return reasons, dups


class GlobalStage:
    """A decision over all live rows at once; reads ``ROW_ID``, ``KEY`` and :attr:`columns`."""

    name: ClassVar[str] = "global"
    reasons: ClassVar[tuple[str, ...]] = ()
    columns: ClassVar[tuple[str, ...]] = ()

    def enabled(self) -> bool:
        return True

    def decide(self, table: Batch) -> Decisions:
        """``table``: live rows sorted by ``ROW_ID``; returns the rows to reject."""
        raise NotImplementedError


__all__ = ["Batch", "Decisions", "GlobalStage", "Resources", "Stage",
           "StageActor", "StageOutput", "apply_stage", "as_str_column", "filled", "mark_rejected",
           "num_rows", "with_bookkeeping"]
