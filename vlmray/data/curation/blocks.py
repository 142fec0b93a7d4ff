"""One Arrow type per column in every block a stage emits, whatever rows a block happens to hold.

Ray Data turns a NumPy batch into an Arrow block by looking at its values, so a column whose
values are all None in one block (a run of rows without a ``.json`` sidecar, a block of rows
that all lack a caption) becomes Arrow ``null``; the next stage's NumPy view of that column is
float32 NaN, and the stage after writes it back as ``float``. Blocks of one column then hold
``string`` here and ``float`` there, and the first operator that concatenates them fails
(``ArrowConversionError: Unable to merge: Field meta has incompatible types: string vs
float``), and a parquet staging written from them is poisoned.

Stages therefore run on Arrow blocks (:meth:`vlmray.data.curation.stage.Stage.on_block`):
:func:`to_numpy` gives a ``null`` column as object None (never NaN), and :func:`to_block`
gives an all-None column the type the column has in the stage's input (the reader's schema, on
from the read), or its known type (:data:`COLUMN_TYPES`), or ``string`` for a stage's
``str_columns``. Absent values are nulls of the column's type.

    table = to_block(stage(to_numpy(block)), column_types(block.schema, stage.str_columns))
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from vlmray.data import schema

Batch = dict[str, np.ndarray]

COLUMN_TYPES: dict[str, pa.DataType] = {
    **dict.fromkeys((schema.KEY, schema.META, schema.URL, schema.SOURCE, schema.REJECT_REASON,
                     schema.REJECT_STAGE, schema.REPAIRS, schema.DUPLICATE_OF, schema.SHA256,
                     schema.TEXT_SIG, schema.SYNTHETIC_CAPTION, schema.CAPTION_FALLBACK),
                    pa.string()),
    schema.IMAGE: pa.binary(), schema.TEXT: pa.binary(),     # TEXT: str after the text stage
    schema.ROW_ID: pa.int64(), schema.WIDTH: pa.int64(), schema.HEIGHT: pa.int64(),
    schema.PHASH: pa.int64(), schema.CLIP_SCORE: pa.float64(),
}
"""The type of a known column when a block gives no other clue (all its values None)."""


def _textual(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t)


def column_types(inputs: pa.Schema | None, str_columns: Iterable[str] = ()) -> dict[str,
                                                                                 pa.DataType]:
    """Column -> the Arrow type an all-None output column gets: ``string`` for
    ``str_columns``, else its type in ``inputs`` (unless ``null``, or a float where a known
    text column belongs), else :data:`COLUMN_TYPES`."""
    types = dict(COLUMN_TYPES)
    for f in inputs if inputs is not None else ():
        known = COLUMN_TYPES.get(f.name)
        poisoned = known is not None and _textual(known) and pa.types.is_floating(f.type)
        if not pa.types.is_null(f.type) and not poisoned:
            types[f.name] = f.type
    types.update(dict.fromkeys(str_columns, pa.string()))
    return types


def to_numpy(table: pa.Table) -> Batch:
    """Ray Data's NumPy batch of an Arrow block, but a ``null``-typed column is an object
    array of None (Ray gives float32 NaN, which a stage would pass on as ``float``)."""
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(table).to_batch_format("numpy")
    for field in table.schema:
        if pa.types.is_null(field.type):
            batch[field.name] = np.full(table.num_rows, None, dtype=object)
    return batch


def to_block(batch: Batch, types: dict[str, pa.DataType]) -> pa.Table:
    """The Arrow block Ray Data makes of ``batch``, with every column that came out ``null``
    (all None, or no rows) cast to its type in ``types``; a known string or binary column
    that came out as NaN floats (a null column read through Ray's NumPy view) is repaired."""
    from ray.data.block import BlockAccessor

    fixed = dict(batch)
    for name, values in batch.items():
        want = types.get(name)
        if want is not None and _textual(want) and np.asarray(values).dtype.kind == "f":
            fixed[name] = _nan_to_none(np.asarray(values))
    table = BlockAccessor.batch_to_block(fixed)
    for i, field in enumerate(table.schema):
        want = types.get(field.name)
        if pa.types.is_null(field.type) and want is not None:
            table = table.set_column(i, pa.field(field.name, want),
                                     pa.nulls(table.num_rows, want))
    return table


def _nan_to_none(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [None if v != v else v for v in values.tolist()]
    return out


__all__ = ["COLUMN_TYPES", "column_types", "to_block", "to_numpy"]
