"""The epoch order (vlmray.data.order): units, the deal, the cursor and the elastic re-deal, in
plain Python: what each worker reads is fixed by (seed, epoch, world, inputs), and across a
restart at any position, with the same or another world size, every row is read exactly once."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from vlmray.data.order import (
    POS_BITS,
    Cursor,
    deal,
    inputs_digest,
    plan_units,
    unit_rows_order,
    unit_size,
)


@dataclass
class Ix:
    rows: int
    offsets: tuple[int, ...] = ()


def _units(rows=(700, 300, 1000, 5), unit_rows=256):
    return plan_units([Ix(r) for r in rows], unit_rows)


def test_units_cover_every_row_once_and_keep_offsets() -> None:
    units = plan_units([Ix(600, (0, 5000, 9000)), Ix(10)], 256)
    assert [(u.file, u.start, u.stop, u.offset) for u in units] == [
        (0, 0, 256, 0), (0, 256, 512, 5000), (0, 512, 600, 9000), (1, 0, 10, None)]
    with pytest.raises(ValueError, match="unit_rows"):
        plan_units([Ix(3)], 0)


def test_units_between_indexed_rows_start_parsing_at_the_last_offset_before() -> None:
    units = plan_units([Ix(50, (0, 700, 1400))], 10, indexed_every=20)
    assert [(u.start, u.offset, u.at) for u in units] == [
        (0, 0, 0), (10, 0, 0), (20, 700, 20), (30, 700, 20), (40, 1400, 40)]


def test_small_inputs_get_small_units() -> None:
    assert unit_size(100_000, 256) == 256
    assert unit_size(400, 256) == 25 and unit_size(10, 256) == 1


def test_deal_depends_on_seed_epoch_and_world_only() -> None:
    a, b = deal(40, 7, 3, 4), deal(40, 7, 3, 4)
    assert a == b
    assert deal(40, 7, 4, 4) != a and deal(40, 8, 3, 4) != a
    dealt = sorted(i.unit for lane in a for i in lane)
    assert dealt == list(range(40))
    assert max(map(len, a)) - min(map(len, a)) <= 1


def test_rows_within_a_unit_are_a_seeded_permutation() -> None:
    u = _units()[1]
    order = unit_rows_order(u, 1, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(u.start, u.stop))
    assert np.array_equal(order, unit_rows_order(u, 1, seed=0, epoch=0))
    assert not np.array_equal(order, unit_rows_order(u, 1, seed=0, epoch=1))


def _read_lane(cur: Cursor, r: int, units, take: int | None = None) -> list[tuple[int, int]]:
    """Simulates worker r reading (and training on) ``take`` rows of its lane from its cursor
    (all of them when None), moving the cursor like the training loop; returns (file, row)."""
    out = []
    for index, item in cur.remaining(r, units):
        u = units[item.unit]
        order = unit_rows_order(u, item.unit, cur.seed, cur.epoch)
        for p in range(item.skip, u.rows):
            if take is not None and len(out) >= take:
                return out
            out.append((u.file, int(order[p])))
            cur.advance(r, (index << POS_BITS) | p)
    return out


def _all_rows(units) -> Counter:
    return Counter((u.file, r) for u in units for r in range(u.start, u.stop))


@pytest.mark.parametrize("before, after", [(2, 2), (2, 3), (4, 2), (3, 1), (1, 4)])
def test_restart_anywhere_reads_every_row_once(before: int, after: int) -> None:
    units = _units()
    rng = random.Random(before * 10 + after)
    cur = Cursor.start(seed=5, epoch=2, world=before, n_units=len(units))
    seen = Counter()
    for r in range(before):                 # each worker stops somewhere in its lane
        total = sum(units[i.unit].rows for i in cur.lane(r))
        seen.update(_read_lane(cur, r, units, take=rng.randrange(0, total + 1)))
    saved = Cursor.from_dict(cur.to_dict())        # through a checkpoint
    resumed = saved.redeal(after, units)
    assert resumed.world == after
    for r in range(after):
        seen.update(_read_lane(resumed, r, units))
    assert seen == _all_rows(units)


def test_same_world_resume_continues_the_same_sequence() -> None:
    units = _units()
    full = Cursor.start(seed=1, epoch=0, world=2, n_units=len(units))
    uninterrupted = _read_lane(full, 1, units)
    cur = Cursor.start(seed=1, epoch=0, world=2, n_units=len(units))
    first = _read_lane(cur, 1, units, take=333)
    again = Cursor.from_dict(cur.to_dict()).redeal(2, units)
    assert again.lanes is None                   # no re-deal: the implicit lanes stay
    assert first + _read_lane(again, 1, units) == uninterrupted


def test_redeal_twice_and_cursor_round_trip() -> None:
    units = _units(rows=(1000, 1000, 17), unit_rows=100)
    cur = Cursor.start(seed=0, epoch=0, world=3, n_units=len(units))
    seen = Counter()
    for r in range(3):
        seen.update(_read_lane(cur, r, units, take=150 + 40 * r))
    cur = Cursor.from_dict(cur.redeal(2, units).to_dict())
    for r in range(2):
        seen.update(_read_lane(cur, r, units, take=333))
    cur = Cursor.from_dict(cur.to_dict()).redeal(5, units)
    assert cur.redeals == 2
    for r in range(5):
        seen.update(_read_lane(cur, r, units))
    assert seen == _all_rows(units)


def test_next_epoch_is_a_fresh_deal() -> None:
    cur = Cursor.start(seed=0, epoch=0, world=2, n_units=10)
    cur.pos[0] = (3, 7)
    nxt = cur.next_epoch()
    assert nxt.epoch == 1 and nxt.pos == [(0, 0), (0, 0)] and nxt.lanes is None


def test_digest_changes_with_the_inputs() -> None:
    files = [("a.tar", "webdataset"), ("b.tar", "webdataset")]
    d = inputs_digest(files, [Ix(10), Ix(20)], 256)
    assert d == inputs_digest(files, [Ix(10), Ix(20)], 256)
    assert d != inputs_digest(files, [Ix(10), Ix(21)], 256)
    assert d != inputs_digest(files, [Ix(10), Ix(20)], 128)
