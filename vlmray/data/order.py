"""The epoch order: which input rows each training worker reads, in which order, as a function
of (seed, epoch, world size) and the inputs alone, and a cursor that says where it stands.

Ray Data promises no order (tasks finish when they finish; ``streaming_split`` hands blocks to
whichever worker asks first), so the order is decided here, before Ray Data runs, and each
worker reads its own part with order preserved:

- **Units.** Every input file is cut into row ranges of at most ``unit_rows`` rows
  (:func:`plan_units`), from an index of row counts (and, for tars, the byte offset of every
  unit's first member, so a unit is read without scanning the tar from its start).
- **The deal.** Epoch e permutes the units with a generator seeded by (seed, e) and deals them
  round-robin to the W workers' *lanes* (:func:`deal`). Within a unit the rows are read in a
  permutation seeded by (seed, e, unit) (:func:`unit_rows_order`).
- **The cursor.** A lane's position is (item, p): items before ``item`` are done, and the
  first p rows of that item's permuted order are done (trained on, or rejected on the way).
  Every training row carries ``LANE_POS = item << 32 | p`` so the worker knows it from the
  rows it trains on. A :class:`Cursor` holds every lane's position; a resumed worker reads its
  lane from there, and the skipped rows are never read (nor their images decoded).
- **Elastic.** With another world size the remaining items of every lane (the partly read one
  from its position) are interleaved and dealt again (:meth:`Cursor.redeal`), so every row of
  the epoch is still read exactly once.

The epoch ends for all workers when one lane cannot fill a batch (the others' rest of the
epoch is its tail, not trained: at most about one unit per lane). Memory is one small record
per unit (a web-scale corpus of 10^9 rows in 1024-row units: about 10^6 records).

    units = plan_units(index, unit_rows=1024)            # index: FileIndex per input file
    cur = Cursor.start(seed=0, epoch=0, world=4, n_units=len(units))
    items = cur.remaining(rank)                          # this worker's lane, from its position
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

POS_BITS = 32
POS_MASK = (1 << POS_BITS) - 1


MIN_UNITS = 16
"""Fewer rows than this many units' worth make the units smaller (:func:`unit_size`), so that
every worker of a small run has units to read."""


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of input file ``file``; ``offset``: where the reader may start
    parsing (a tar's byte offset) to reach row ``at`` <= ``start``, None = the file's start."""

    file: int
    start: int
    stop: int
    offset: int | None = None
    at: int = 0

    @property
    def rows(self) -> int:
        return self.stop - self.start


def unit_size(total_rows: int, unit_rows: int) -> int:
    """``unit_rows``, or fewer when the inputs hold fewer than :data:`MIN_UNITS` units of it
    (a function of the data alone: a resume with another world size keeps the units)."""
    return max(1, min(unit_rows, total_rows // MIN_UNITS))


def plan_units(index: Sequence[Any], unit_rows: int, *, indexed_every: int = 0) -> list[Unit]:
    """The canonical unit list: each file's rows in ranges of ``unit_rows`` (the last shorter),
    files in input order. ``index[f]`` has ``rows`` and ``offsets``: the byte offset of every
    ``indexed_every``-th row (default ``unit_rows``), or none (read from the file's start); a
    unit starts parsing at the last offset at or before its first row."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    every = indexed_every or unit_rows
    units = []
    for f, ix in enumerate(index):
        offsets = list(getattr(ix, "offsets", ()) or ())
        for start in range(0, int(ix.rows), unit_rows):
            j = start // every
            known = j < len(offsets)
            units.append(Unit(f, start, min(start + unit_rows, int(ix.rows)),
                              offsets[j] if known else None, j * every if known else 0))
    return units


def _seed(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) % (1 << 63) for w in words]))


def unit_rows_order(unit: Unit, unit_id: int, seed: int, epoch: int) -> np.ndarray:
    """The unit's rows (absolute row indices in its file) in epoch ``epoch``'s order."""
    return unit.start + _seed(seed, epoch, unit_id, 1).permutation(unit.rows)


@dataclass(frozen=True)
class Item:
    """One unit of a lane, and how many rows of its permuted order were done before it was
    dealt (0 but for a partly read unit dealt again after an elastic restart)."""

    unit: int
    skip: int = 0


def deal(n_units: int, seed: int, epoch: int, world: int) -> list[list[Item]]:
    """Epoch ``epoch``'s lanes: the units permuted by (seed, epoch), dealt round-robin."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    perm = _seed(seed, epoch, 0).permutation(n_units)
    return [[Item(int(u)) for u in perm[r::world]] for r in range(world)]


@dataclass
class Cursor:
    """Where every lane of an epoch stands. ``lanes`` is None while the lanes are the deal of
    (seed, epoch, world) (kept implicit: a checkpoint stays small); after an elastic re-deal
    they are explicit. ``pos[r] = (item, p)``: lane r's items before ``item`` are done and the
    first p rows of that item's order (an absolute position, >= the item's ``skip``)."""

    seed: int
    epoch: int
    world: int
    n_units: int
    pos: list[tuple[int, int]]
    lanes: list[list[Item]] | None = None
    redeals: int = field(default=0)

    @classmethod
    def start(cls, *, seed: int, epoch: int, world: int, n_units: int) -> Cursor:
        """The start of epoch ``epoch`` with ``world`` lanes."""
        return cls(seed, epoch, world, n_units, [(0, 0)] * world)

    def lane(self, r: int) -> list[Item]:
        return (self.lanes[r] if self.lanes is not None
                else deal(self.n_units, self.seed, self.epoch, self.world)[r])

    def remaining(self, r: int, units: Sequence[Unit] | None = None) -> list[tuple[int, Item]]:
        """Lane r from its position: ``(item index in the lane, item)`` pairs, the partly read
        item with ``skip`` = its position; items with nothing left (``units`` given) dropped."""
        return _remaining(self.lane(r), self.pos[r], units)

    def advance(self, r: int, lane_pos: int) -> None:
        """Records that lane r trained on the row at ``lane_pos`` (``item << 32 | p``) and
        everything before it in its lane."""
        item, p = lane_pos >> POS_BITS, lane_pos & POS_MASK
        if (item, p + 1) > tuple(self.pos[r]):
            self.pos[r] = (item, p + 1)

    def redeal(self, world: int, units: Sequence[Unit] | None = None) -> Cursor:
        """The same epoch's remaining items dealt to ``world`` lanes: the lanes' remaining
        items interleaved (first items of every lane, then the second ones...), then dealt
        round-robin. Same world: unchanged."""
        if world == self.world:
            return self
        rest = [[item for _, item in self.remaining(r, units)] for r in range(self.world)]
        order = [lane[i] for i in range(max(map(len, rest), default=0))
                 for lane in rest if i < len(lane)]
        lanes = [order[r::world] for r in range(world)]
        return Cursor(self.seed, self.epoch, world, self.n_units,
                      [(0, lane[0].skip if lane else 0) for lane in lanes], lanes,
                      self.redeals + 1)

    def next_epoch(self) -> Cursor:
        return Cursor.start(seed=self.seed, epoch=self.epoch + 1, world=self.world,
                            n_units=self.n_units)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint (the lanes only when they were re-dealt)."""
        return {"seed": self.seed, "epoch": self.epoch, "world": self.world,
                "n_units": self.n_units, "pos": [list(p) for p in self.pos],
                "lanes": None if self.lanes is None
                else [[[i.unit, i.skip] for i in lane] for lane in self.lanes],
                "redeals": self.redeals}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cursor:
        lanes = d.get("lanes")
        return cls(int(d["seed"]), int(d["epoch"]), int(d["world"]), int(d["n_units"]),
                   [(int(a), int(b)) for a, b in d["pos"]],
                   None if lanes is None else [[Item(int(u), int(s)) for u, s in lane]
                                               for lane in lanes],
                   int(d.get("redeals", 0)))


def _remaining(lane: list[Item], pos: tuple[int, int],
               units: Sequence[Unit] | None) -> list[tuple[int, Item]]:
    item, p = pos
    out = []
    for i in range(item, len(lane)):
        it = lane[i] if i > item else Item(lane[i].unit, max(p, lane[i].skip))
        if units is not None and it.skip >= units[it.unit].rows:
            continue
        out.append((i, it))
    return out


def inputs_digest(files: Sequence[tuple[str, str]], index: Sequence[Any], unit_rows: int) -> str:
    """What the order depends on besides the seed: the files, their row counts, the unit
    size. A cursor is only valid for inputs with the same digest."""
    h = hashlib.sha256(str(unit_rows).encode())
    for (uri, fmt), ix in zip(files, index):
        h.update(f"{uri}\0{fmt}\0{int(ix.rows)}\n".encode())
    return h.hexdigest()[:16]


__all__ = ["MIN_UNITS", "POS_BITS", "POS_MASK", "Cursor", "Item", "Unit", "deal",
           "inputs_digest", "plan_units", "unit_rows_order", "unit_size"]
