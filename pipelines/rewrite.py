"""Rewrite pipeline: read -> rewrite_plan (La-CLIP rewrites, ALIP synthetic captions, validated
with a counted fallback reason) -> shards in input order + stats.json.

Copy this module to build your own: every step is a public vlmray function.

    from pipelines.rewrite import RewriteJobConfig, run
    stats = run(RewriteJobConfig(input="s3://curated/v1", output="s3://rewritten/v1",
                                 rewrite=RewriteConfig(backend="transformers", model="smollm2",
                                                       k=2)))

Output layout (train from it with ``--data.source <output>``)::

    <output>/shards/part-00000.tar ...  every input row, in input order; the JSON sidecar adds
                                        texts_aug, rewrite_fallbacks[, synthetic_caption,
                                        caption_fallback] (parquet: also as columns)
    <output>/eval/                      the input's held-out split, copied (built-in: always)
    <output>/raw/                       the generated built-in data (input "builtin" only)
    <output>/stats.json                 rows in/out, fallbacks by reason, tokens, throughput
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlmray.config import ConfigError
from vlmray.data import schema
from vlmray.data.curation.readers import ReadConfig, list_inputs, read_inputs
from vlmray.data.curation.writers import WriteConfig, write_shards
from vlmray.data.storage import filesystem, join, remove, write_bytes_atomic
from vlmray.data.synthetic import SyntheticConfig
from vlmray.rewrite.config import RewriteConfig
from vlmray.rewrite.stage import (
    CAPTION_TOKENS_OUT,
    REWRITE_TOKENS,
    check_rewrite,
    fallback_counts,
    rewrite_plan,
)

N_EXAMPLES = 5


@dataclass(kw_only=True)
class RewriteJobConfig:
    """What ``jobs/rewrite_captions.py`` runs: read -> rewrite -> shards + stats.json."""

    input: str = "builtin"
    """Input: a dataset root (``<input>/shards`` or ``<input>/train``), a directory, glob or
    file of webdataset ``.tar`` / ``.parquet``, local or ``s3://``; ``builtin`` generates the
    built-in dataset into ``<output>/raw`` and rewrites its train split."""
    output: str = ""
    """Output root (local or ``s3://``): ``shards/``, ``eval/``, ``stats.json``."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Built-in dataset settings, used when ``input == "builtin"``."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Input format and column names."""
    write: WriteConfig = field(default_factory=WriteConfig)
    """Output shard format and size."""
    rewrite: RewriteConfig = field(default_factory=lambda: RewriteConfig(k=4))
    """Rewrites per caption (La-CLIP used 4), backend, model, sampling, validation, captioner."""


def input_root(job: RewriteJobConfig) -> str:
    """The dataset root: ``<output>/raw`` (built-in, generated now) or ``job.input``."""
    if job.input != "builtin":
        return job.input
    from vlmray.data.synthetic import ensure_synthetic

    return ensure_synthetic(job.synthetic, join(job.output, "raw"))


def input_uri(job: RewriteJobConfig) -> str:
    """The shards to read: ``<root>/shards`` or ``<root>/train`` when there, else the input."""
    root = input_root(job)
    fs, path = filesystem(root)
    if not any(c in root for c in "*?[") and fs.isdir(path):
        for sub in ("shards", "train"):
            if fs.isdir(f"{path.rstrip('/')}/{sub}"):
                return join(root, sub)
    return root


def copy_eval(job: RewriteJobConfig) -> str:
    """Copies ``<root>/eval`` (the held-out split) to ``<output>/eval``; "" when none."""
    src = join(input_root(job), "eval")
    fs, path = filesystem(src)
    if any(c in src for c in "*?[") or not fs.isdir(path):
        return ""
    dst = join(job.output, "eval")
    remove(dst)
    for f in sorted(fs.find(path)):
        with fs.open(f, "rb") as fh:
            write_bytes_atomic(join(dst, f[len(path.rstrip("/")) + 1:]), fh.read())
    return dst


def validate_job(job: RewriteJobConfig) -> None:
    """Fails before Ray starts: no output, nothing to do, a bad backend / model / input."""
    if not job.output:
        raise ConfigError("--output is required (a local path or s3:// URI)")
    if not job.rewrite.enabled:
        raise ConfigError("nothing to do: set --rewrite.k > 0 and/or --rewrite.captioner "
                          "(oracle, transformers, vllm)")
    check_rewrite(job.rewrite)
    if job.input != "builtin":
        list_inputs(input_uri(job), job.read)


def _with_reject_column(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch[schema.REJECT_REASON] = np.full(len(batch[schema.KEY]), "", dtype=object)
    return batch


def _column_sum(ds, column: str) -> int:
    if column not in ds.columns():
        return 0
    return int(sum(int(np.asarray(b[column]).sum()) for b in ds.select_columns([column])
                   .iter_batches(batch_format="numpy", batch_size=4096)))


def _examples(ds, row_ids: np.ndarray) -> list[dict[str, Any]]:
    """The first rows (input order): original caption -> texts_aug (and synthetic caption)."""
    first = set(row_ids[:N_EXAMPLES].tolist())
    rows = ds.drop_columns([schema.IMAGE]).filter(lambda r: r[schema.ROW_ID] in first)
    rows = rows.take_all()
    out = []
    for r in sorted(rows, key=lambda r: r[schema.ROW_ID]):
        text = r[schema.TEXT]
        ex = {"key": r[schema.KEY],
              "text": text.decode("utf-8", "replace") if isinstance(text, bytes) else text,
              schema.TEXTS_AUG: list(r[schema.TEXTS_AUG]),
              schema.REWRITE_FALLBACKS: list(r[schema.REWRITE_FALLBACKS])}
        for col in (schema.SYNTHETIC_CAPTION, schema.CAPTION_FALLBACK):
            if col in r:
                ex[col] = r[col]
        out.append(ex)
    return out


def _write(final, job: RewriteJobConfig) -> tuple[np.ndarray, int, int]:
    """All rows to ``<output>/shards`` in ``ROW_ID`` order; (row ids, rows written, shards)."""
    ids = np.sort(np.concatenate([b[schema.ROW_ID] for b in final.select_columns(
        [schema.ROW_ID]).iter_batches(batch_format="numpy", batch_size=None)]))
    shards_uri = join(job.output, "shards")
    remove(shards_uri)
    n_shards = -(-len(ids) // job.write.shard_size)
    written = write_shards(final, ids, list(range(n_shards)), shards_uri, job.write, "jpg")
    return ids, sum(int(r["rows"]) for r in written), n_shards


def run(job: RewriteJobConfig) -> dict[str, Any]:
    """Rewrites every row; writes shards, ``eval/`` and stats.json; fails loudly if
    rows_in != rows_out."""
    from vlmray.api import init_ray

    validate_job(job)
    t0 = time.perf_counter()
    uri = input_uri(job)
    eval_uri = copy_eval(job)
    init_ray()
    raw = read_inputs(uri, job.read).map_batches(_with_reject_column, batch_format="numpy")
    raw = raw.materialize()
    rows_in, t_read = raw.count(), time.perf_counter()
    final = rewrite_plan(raw, job.rewrite).materialize()
    rewrite_s = time.perf_counter() - t_read
    ids, rows_out, n_shards = _write(final, job)
    if not rows_in == final.count() == rows_out == len(np.unique(ids)):
        raise RuntimeError(f"rows_in {rows_in} != rows_out {rows_out} (after rewriting: "
                           f"{final.count()}, distinct row ids: {len(np.unique(ids))})")
    cfg = job.rewrite
    tokens = {"rewrites": _column_sum(final, REWRITE_TOKENS),
              "captions": _column_sum(final, CAPTION_TOKENS_OUT)}
    generated = rows_in * cfg.k + (rows_in if cfg.captioner != "none" else 0)
    stats = {"input": uri, "output": job.output, "eval": eval_uri, "rows_in": rows_in,
             "rows_out": rows_out, "shards": n_shards, "format": job.write.format,
             "k": cfg.k, "backend": cfg.backend, "model": cfg.model,
             "captioner": cfg.captioner, **fallback_counts(final),
             "generated_tokens": tokens, "rewrite_s": round(rewrite_s, 2),
             "captions_per_s": round(generated / max(rewrite_s, 1e-9), 2),
             "output_tokens_per_s": round(sum(tokens.values()) / max(rewrite_s, 1e-9), 2),
             "examples": _examples(final, ids), "config": asdict(job)}
    stats["wall_s"] = round(time.perf_counter() - t0, 2)
    write_bytes_atomic(join(job.output, "stats.json"),
                       json.dumps(stats, indent=2, ensure_ascii=False).encode())
    return stats


__all__ = ["RewriteJobConfig", "copy_eval", "input_root", "input_uri", "run", "validate_job"]
