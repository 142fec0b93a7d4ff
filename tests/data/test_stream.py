"""StreamTally: each input row counted once however often the stream re-reads it (no Ray).

    pytest tests/data/test_stream.py -q
"""

from __future__ import annotations

import numpy as np

from vlmray.data.stream import StreamTally


def _ids(file: int, rows: list[int]) -> np.ndarray:
    return (np.int64(file) << 32) | np.asarray(rows, dtype=np.int64)


def test_rows_are_counted_once_across_passes_and_batchings() -> None:
    tally = StreamTally()
    reasons = np.array(["", "decode_error", "", "text_too_long"], dtype=object)
    new = tally.add(_ids(0, [0, 1, 2, 3]), reasons)
    assert new.tolist() == [True] * 4
    # a second pass, batched differently, mixed with rows of another file
    again = tally.add(np.concatenate([_ids(0, [3, 1]), _ids(7, [5])]),
                      np.array(["text_too_long", "decode_error", "decode_error"], dtype=object))
    assert again.tolist() == [False, False, True]
    assert tally.totals() == {"rows_in": 5, "rows_accepted": 2, "rows_rejected": 3,
                              "reject_reasons": {"decode_error": 2, "text_too_long": 1}}


def test_bitmaps_grow_for_large_row_indices() -> None:
    tally = StreamTally()
    tally.add(_ids(1, [2]), np.array([""], dtype=object))
    new = tally.add(_ids(1, [100_000, 2]), np.array(["", ""], dtype=object))
    assert new.tolist() == [True, False]
    assert tally.totals()["rows_in"] == 2
