"""The held-out split, loaded once into tensors (no Ray): images, captions, labels, classes."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from vlmray.data import schema
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.render import render_texts
from vlmray.data.storage import arrow_filesystem
from vlmray.data.tokenize import Tokenizer
from vlmray.eval.sources import (
    ACCEPTED_SHAPES,
    EvalSource,
    EvalSourceError,
    class_index,
    iter_eval_rows,
    open_eval_source,
    row_label,
)


@dataclass
class HeldOut:
    pixels: Tensor          # (N, 3, S, S) uint8
    tokens: Tensor          # (N, L) int64, the paired captions
    token_mask: Tensor      # (N, L)
    labels: Tensor          # (N,) int64
    classnames: list[str]
    templates: list[str]
    rows_rejected: int = 0
    keys: list[str] = field(default_factory=list)
    refs: tuple[Tensor, Tensor, Tensor] | None = None
    """RA-CLIP: each image's retrieved (ref_image (N, k, Dr), ref_text (N, k, Dr), mask (N, k))."""
    texts: list[str] = field(default_factory=list)
    """The N paired caption strings (CLIPPO's evaluation renders them as images)."""
    metas: list[str] = field(default_factory=list)
    """The N JSON sidecars, verbatim: what evaluations beyond labels read (the built-in data's
    object boxes, phrases and shapes for grounding and segmentation)."""
    _rendered: dict[tuple[str, int], Tensor] = field(default_factory=dict, init=False,
                                                     repr=False, compare=False)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def rendered_captions(self, size: int) -> Tensor:
        """The captions drawn as images (``vlmray.data.render``): uint8 (N, 3, size, size);
        rendered once per size and cached."""
        if len(self.texts) != len(self):
            raise ValueError(f"HeldOut has {len(self.texts)} caption strings for {len(self)} "
                             f"images; a model reading rendered text needs HeldOut.texts "
                             f"(load_heldout fills it)")
        return self._render("captions", self.texts, size)

    def rendered_prompts(self, size: int) -> Tensor:
        """The class prompts (:func:`class_prompts`, class-major) drawn as images:
        uint8 (C * T, 3, size, size); cached."""
        return self._render("prompts", class_prompts(self.classnames, self.templates), size)

    def _render(self, kind: str, texts: list[str], size: int) -> Tensor:
        if (kind, size) not in self._rendered:
            self._rendered[kind, size] = torch.from_numpy(render_texts(texts, size))
        return self._rendered[kind, size]

    def with_refs(self, uri: str) -> HeldOut:
        """A copy carrying the references of each row, read from the parquet file at ``uri``
        (columns KEY, REF_IMAGE_EMBEDS, REF_TEXT_EMBEDS, REF_MASK; written by
        :func:`vlmray.pipelines.retrieval.write_eval_refs`). Every held-out key must be there."""
        import pyarrow.parquet as pq

        fs, path = arrow_filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        row = {k: i for i, k in enumerate(table.column(schema.KEY).to_pylist())}
        missing = [k for k in self.keys if k not in row]
        if missing:
            raise ValueError(f"{uri}: no references for {len(missing)} held-out rows "
                             f"(e.g. {missing[0]!r})")
        take = [row[k] for k in self.keys]
        refs = tuple(torch.from_numpy(_tensor_column(table, c)[take]) for c in
                     (schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK))
        return dataclasses.replace(self, refs=refs)


def load_heldout(uri: str, spec: DecodeSpec, tokenizer: Tokenizer, *, max_samples: int) -> HeldOut:
    """Reads up to ``max_samples`` rows of the clean split at ``uri``, its class names and
    templates, in any shape :mod:`vlmray.eval.sources` accepts (shards with ``classes.json``,
    a plain list of names, ``classnames.txt``, an ImageNet-style folder; the built-in
    templates when none are given). Labels come from the sidecars' ``label`` (an index or a
    class name) or the class folders; a row without one counts in retrieval, not zero-shot.
    Raises :class:`~vlmray.eval.sources.EvalSourceError` (a ``ConfigError``) naming what is
    missing and the accepted shapes."""
    src = open_eval_source(uri)
    rows = list(itertools.islice(iter_eval_rows(src), max_samples))
    if not rows:
        raise EvalSourceError(f"held-out split {uri!r} has no samples; {ACCEPTED_SHAPES}")
    metas = [r.get(schema.META) for r in rows]
    batch = prepare_rows([r[schema.KEY] for r in rows], [r.get(schema.IMAGE) for r in rows],
                         [r.get(schema.TEXT) for r in rows], metas, spec, tokenizer)
    ok = batch[schema.REJECT_REASON] == ""
    labels = np.asarray(_labels(src, rows, metas), dtype=np.int64)
    if not (labels[ok] >= 0).any():
        raise EvalSourceError(f"held-out split {uri!r}: none of its {int(ok.sum())} readable "
                              f"rows (of {len(rows)}) has a label; {ACCEPTED_SHAPES}")
    return HeldOut(
        pixels=torch.from_numpy(batch[schema.PIXELS][ok]),
        tokens=torch.from_numpy(batch[schema.TOKENS][ok]),
        token_mask=torch.from_numpy(batch[schema.TOKEN_MASK][ok]),
        labels=torch.from_numpy(labels[ok]),
        classnames=src.classnames, templates=src.templates, rows_rejected=int((~ok).sum()),
        keys=[str(k) for k in batch[schema.KEY][ok]],
        texts=[str(t) for t in batch[schema.TEXT][ok]],
        metas=[_meta_str(m) for m, keep in zip(metas, ok) if keep],
    )


def _labels(src: EvalSource, rows: list[dict], metas: list[object]) -> list[int]:
    """Each row's class index (-1: none), or an :class:`EvalSourceError` naming the row."""
    index, out = class_index(src.classnames), []
    for row, meta in zip(rows, metas):
        try:
            out.append(row_label(meta, src.classnames, index))
        except ValueError as e:
            raise EvalSourceError(f"held-out split {src.uri!r}, row {row[schema.KEY]!r}: {e} "
                                  f"(class names from {src.classes_from}); "
                                  f"{ACCEPTED_SHAPES}") from None
    return out


def _meta_str(meta: object) -> str:
    if isinstance(meta, bytes):
        return meta.decode("utf-8", errors="replace")
    return "" if meta is None else str(meta)


def _tensor_column(table: object, name: str) -> np.ndarray:
    """A (N, ...) float32 array from a (nested) fixed-size-list or tensor column."""
    column = table.column(name).combine_chunks()
    try:
        return np.asarray(column.to_numpy_ndarray(), dtype=np.float32)   # Arrow tensor extension
    except AttributeError:
        return np.asarray(column.to_pylist(), dtype=np.float32)


def class_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: (C * T) strings."""
    return [t.format(c) for c in classnames for t in templates]


__all__ = ["HeldOut", "class_prompts", "load_heldout"]
