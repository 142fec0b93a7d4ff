"""Rewrite pipeline: read -> rewrite_plan (La-CLIP rewrites, ALIP synthetic captions, validated
with a counted fallback reason) -> shards in input order + stats.json, as one stream.

Nothing is materialised: the plan runs once, straight into the streamed shard writer
(:func:`~vlmray.data.curation.piece_writer.write_shards_streamed`), and every figure of stats.json
(rows, fallbacks, tokens, examples) comes from its small per-batch summaries. The rows read
are counted by row id where they are read (a :class:`~vlmray.data.stream.StreamTally` actor,
one bit a row), so rows in = rows after rewriting = rows written = distinct row ids is
checked on compact data.

Copy this module to build your own: every step is a public vlmray function.

    from vlmray.pipelines.rewrite import RewriteJobConfig, run
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
    <output>/_job.json                  claims the folder for rewrite jobs (a re-run replaces)
    <output>/_incoming/                 the new shards/ and eval/ while they are written

The output must be apart from the input (not it, not inside it, not holding it) and new, empty
or an earlier rewrite's (:mod:`vlmray.data.outputs`), checked before Ray starts. A re-run
replaces ``shards/`` and ``eval/`` only once their replacements are complete in
``_incoming/`` (:func:`~vlmray.data.storage.publish`): a failed run leaves the old output as
it was.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlmray.config import ConfigError
from vlmray.config.jobs import RewriteJobConfig
from vlmray.data import schema
from vlmray.data.curation.piece_writer import write_shards_streamed
from vlmray.data.curation.readers import list_inputs, read_inputs
from vlmray.data.outputs import check_output, claim_output
from vlmray.data.storage import filesystem, join, publish, remove, write_bytes_atomic
from vlmray.data.stream import FALLBACK_COLUMNS, StreamTally, count_fallbacks
from vlmray.data.synthetic import ensure_synthetic
from vlmray.rewrite.stage import (
    CAPTION_TOKENS_OUT,
    REWRITE_TOKENS,
    check_rewrite,
    fallback_tallies,
    rewrite_plan,
)
from vlmray.runtime import init_ray

N_EXAMPLES = 5
JOB = "rewrite"
INCOMING = "_incoming"


def input_root(job: RewriteJobConfig) -> str:
    """The dataset root: ``<output>/raw`` (built-in, generated now) or ``job.input``."""
    if job.input != "builtin":
        return job.input

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


def copy_eval(job: RewriteJobConfig, dst: str) -> bool:
    """Copies ``<root>/eval`` (the held-out split) to ``dst``; False when there is none."""
    src = join(input_root(job), "eval")
    fs, path = filesystem(src)
    if any(c in src for c in "*?[") or not fs.isdir(path):
        return False
    for f in sorted(fs.find(path)):
        with fs.open(f, "rb") as fh:
            write_bytes_atomic(join(dst, f[len(path.rstrip("/")) + 1:]), fh.read())
    return True


def validate_job(job: RewriteJobConfig) -> None:
    """Fails before Ray starts: no output, an output over the input or holding other files,
    nothing to do, a bad backend / model / input."""
    if not job.output:
        raise ConfigError("--output is required (a local path or s3:// URI)")
    check_output(job.output, [] if job.input == "builtin" else [job.input], job=JOB)
    if not job.rewrite.enabled:
        raise ConfigError("nothing to do: set --rewrite.k > 0 and/or --rewrite.captioner "
                          "(oracle, transformers, vllm)")
    check_rewrite(job.rewrite)
    if job.input != "builtin":
        list_inputs(input_uri(job), job.read)


REJECT_COLUMNS = (schema.ROW_ID, schema.KEY, schema.REJECT_STAGE, schema.REJECT_REASON)
"""What ``<output>/rejects/`` keeps of each row the reader refused."""

def _read_rows(batch: dict[str, np.ndarray], tally: Any) -> dict[str, np.ndarray]:
    """After the read: each row counted by row id in the
    :class:`~vlmray.data.stream.StreamTally` actor (once, even if a read task is retried),
    with the reason the reader refused it ("" = live: a bad key, a path outside the input,
    a file too large), so a refused row is rejected and counted instead of failing the job."""
    import ray

    n = len(batch[schema.KEY])
    reasons = batch.get(schema.REJECT_REASON)
    reasons = np.full(n, "", dtype=object) if reasons is None else np.asarray(
        [r or "" for r in reasons], dtype=object)
    batch[schema.REJECT_REASON] = reasons
    ray.get(tally.add.remote(batch[schema.ROW_ID], reasons))
    return batch


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _first_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The batch's N_EXAMPLES rows with the smallest ``ROW_ID``: caption -> texts_aug [and
    synthetic caption], for stats.json."""
    first = np.argsort(table[schema.ROW_ID].to_numpy(), kind="stable")[:N_EXAMPLES]
    cols = [schema.ROW_ID, schema.KEY, schema.TEXT, schema.TEXTS_AUG, schema.REWRITE_FALLBACKS,
            schema.SYNTHETIC_CAPTION, schema.CAPTION_FALLBACK]
    rows = table.take(pa.array(first)).select([c for c in cols if c in table.column_names])
    return [{c: ([_str(x) for x in v] if isinstance(v, list) else
                 v if c == schema.ROW_ID else _str(v)) for c, v in r.items()}
            for r in rows.to_pylist()]


def batch_summary(table: pa.Table) -> dict[str, Any]:
    """Pass A of the writer, per batch: fallback counts, generated tokens, the first rows."""
    cols = table.column_names
    tokens = {name: int(pc.sum(table[col]).as_py() or 0) if col in cols else 0
              for name, col in (("rewrites", REWRITE_TOKENS), ("captions", CAPTION_TOKENS_OUT))}
    fallbacks = count_fallbacks({c: table[c].to_numpy(zero_copy_only=False)
                                 for c in FALLBACK_COLUMNS if c in cols})
    return {"fallbacks": fallbacks, "tokens": tokens, "examples": _first_rows(table)}


@dataclass
class Totals:
    """The driver's sum of :func:`batch_summary` over the stream (its size: a few counters)."""

    fallbacks: dict[str, Counter[str]] = field(default_factory=dict)
    tokens: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, doc: dict[str, Any]) -> None:
        for key, counts in doc["fallbacks"].items():
            self.fallbacks.setdefault(key, Counter()).update(counts)
        self.tokens.update(doc["tokens"])
        self.examples = sorted(self.examples + doc["examples"],
                               key=lambda r: r[schema.ROW_ID])[:N_EXAMPLES]

    def examples_out(self) -> list[dict[str, Any]]:
        return [{c: v for c, v in r.items() if c != schema.ROW_ID} for r in self.examples]


def _write(job: RewriteJobConfig, uri: str,
           shards_uri: str, rejects_uri: str
           ) -> tuple[dict[str, Any], Totals, dict[str, Any]]:
    """read -> rewrite_plan -> shards at ``shards_uri`` (rows the reader refused: their key,
    reason and stage under ``rejects_uri``), streamed: (writer's counts, totals, the read's
    tally: rows_in, rows_rejected, reject_reasons)."""
    import ray

    tally = ray.remote(StreamTally).options(num_cpus=0).remote()
    rows = read_inputs(uri, job.read).map_batches(_read_rows, fn_kwargs={"tally": tally},
                                                  batch_format="numpy", batch_size=None)
    totals = Totals()
    out = write_shards_streamed(rewrite_plan(rows, job.rewrite), shards_uri, job.write, "jpg",
                                summarize=batch_summary, on_summary=totals.add,
                                rejects_uri=rejects_uri, reject_columns=REJECT_COLUMNS)
    read = ray.get(tally.totals.remote())
    ray.kill(tally)
    return out, totals, read


def run(job: RewriteJobConfig) -> dict[str, Any]:
    """Rewrites every row; writes shards, ``eval/`` and stats.json; fails loudly if
    rows_in != rows_out, leaving any earlier output untouched."""
    validate_job(job)
    t0 = time.perf_counter()
    claim_output(job.output, JOB)
    incoming = join(job.output, INCOMING)
    remove(incoming)                             # a failed run's partial output, never read
    uri = input_uri(job)
    has_eval = copy_eval(job, join(incoming, "eval"))
    init_ray()
    out, totals, read = _write(job, uri, join(incoming, "shards"), join(incoming, "rejects"))
    rows_in, rejected = read["rows_in"], read["rows_rejected"]
    if not (rows_in == out["rows"] == out["rows_out"] + out["rows_rejected"]
            and out["rows_out"] == out["rows_written"] == out["distinct_row_ids"]
            and out["rows_rejected"] == rejected):
        raise RuntimeError(f"rows_in {rows_in} != rows_out {out['rows_written']} + rejected "
                           f"{rejected} (after rewriting: {out['rows']}, kept: "
                           f"{out['rows_out']}, distinct row ids: {out['distinct_row_ids']})")
    parts = ["shards", "eval"] if has_eval else ["shards"]
    if not rejected:
        remove(join(job.output, "rejects"))      # an earlier run's, no longer true
    for part in parts + (["rejects"] if rejected else []):
        publish(join(incoming, part), join(job.output, part))
    remove(incoming)
    eval_uri = join(job.output, "eval") if has_eval else ""
    cfg, rewrite_s = job.rewrite, out["stream_s"]
    tokens = {"rewrites": totals.tokens["rewrites"], "captions": totals.tokens["captions"]}
    live = rows_in - rejected
    generated = live * cfg.k + (live if cfg.captioner != "none" else 0)
    fallbacks = {k: dict(v) for k, v in totals.fallbacks.items()}
    stats = {"input": uri, "output": job.output, "eval": eval_uri, "rows_in": rows_in,
             "rows_out": out["rows_written"], "rows_rejected": rejected,
             "reject_reasons": read["reject_reasons"], "shards": out["shards"],
             "format": job.write.format, "k": cfg.k, "backend": cfg.backend, "model": cfg.model,
             "captioner": cfg.captioner, **fallback_tallies(fallbacks),
             "generated_tokens": tokens, "rewrite_s": rewrite_s,
             "captions_per_s": round(generated / max(rewrite_s, 1e-9), 2),
             "output_tokens_per_s": round(sum(tokens.values()) / max(rewrite_s, 1e-9), 2),
             "write_s": out["assemble_s"], "examples": totals.examples_out(),
             "config": asdict(job)}
    stats["wall_s"] = round(time.perf_counter() - t0, 2)
    write_bytes_atomic(join(job.output, "stats.json"),
                       json.dumps(stats, indent=2, ensure_ascii=False).encode())
    return stats


__all__ = ["copy_eval", "input_root", "input_uri", "run", "validate_job"]
