"""Rows cut off by a truncated tar: the reason ``truncated_shard``, given by the read.

A tar that ends early (an error while parsing: a cut member or header, a broken gzip stream;
or an uncompressed ``.tar`` without its end-of-archive marker) still yields the rows before the
cut. Only its LAST row can have been cut: it is rejected as ``truncated_shard`` when the cut
fell inside one of its members' data, or when it lacks an image or a caption member (they were
after the cut), rather than as ``missing_text`` / ``missing_image`` later on. Its earlier rows,
and a last row that is whole, pass on. Both readers of tars (``read_file`` and the row-subset
reader ``read_rows``) decide it here, so they agree.
"""

from __future__ import annotations

import tarfile
from typing import Any

from vlmray.data import schema

TRUNCATED_SHARD = "truncated_shard"
END_OF_ARCHIVE = 1024
"""Bytes of zeros that end a tar (two 512-byte blocks)."""


def lacks_end_marker(size: int, tar: tarfile.TarFile | None) -> bool:
    """True when a fully parsed uncompressed tar of ``size`` bytes has no end-of-archive
    marker after its last member (``tar.offset``: where the next header would start)."""
    return tar is not None and size < tar.offset + END_OF_ARCHIVE


def mark_cut(row: dict[str, Any] | None, *, inside_member: bool) -> bool:
    """Marks the last row of a tar that ended early ``truncated_shard`` when it was cut (the
    cut fell inside its member data, or it has no image or no caption member); a reason the
    read already gave stays. Returns whether the row was marked."""
    if row is None or row.get(schema.REJECT_REASON):
        return False
    if inside_member or row.get(schema.IMAGE) is None or row.get(schema.TEXT) is None:
        row[schema.REJECT_REASON] = TRUNCATED_SHARD
        return True
    return False


__all__ = ["END_OF_ARCHIVE", "TRUNCATED_SHARD", "lacks_end_marker", "mark_cut"]
