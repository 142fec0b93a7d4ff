"""A table's rows (parquet, CSV, TSV, JSONL) as the reader's columns: keys as str, images from
bytes or from paths confined to the table's folder (:func:`read_images`), captions as the bytes
given, sidecars as str, URLs stripped. Shared by the whole-file reader
(:mod:`vlmray.data.curation.readers`) and the row-subset reader (:mod:`.row_ranges`)."""

from __future__ import annotations

import json
from typing import Any

from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.image_paths import read_images


def _text_bytes(value: Any) -> bytes | None:
    """Caption bytes as given: str is encoded back (CSVs are read with surrogateescape)."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def _meta_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else json.dumps(
        value, default=str)


def table_rows(columns: dict[str, list[Any]], roles: dict[str, str | None], n: int, uri: str,
               cfg: ReadConfig) -> dict[str, list[Any]]:
    """A table's ``n`` rows (``columns`` by name, ``roles`` naming them) as reader columns:
    keys as str, images from bytes or from confined paths (:func:`read_images`), captions as
    bytes, sidecars as str, URLs stripped."""
    def col(role: str) -> list[Any]:
        return columns[roles[role]] if roles[role] else [None] * n

    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    images, reasons = read_images(col("image"), col("image_path"), base, cfg)
    return {schema.KEY: [None if v is None else str(v) for v in col("key")],
            schema.IMAGE: images, schema.REJECT_REASON: reasons,
            schema.TEXT: [_text_bytes(v) for v in col("text")],
            schema.META: [_meta_str(v) for v in col("meta")],
            schema.URL: ["" if v is None else str(v).strip() for v in col("url")]}


__all__ = ["table_rows"]
