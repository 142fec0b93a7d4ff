"""Curation pipeline: read -> [download] -> text -> image -> [score] -> dedup -> [top fraction]
-> write fixed-size shards, ``rejects/`` (a reason per row) and ``stats.json``; streamed, so
memory is bounded by settings, never by the number of rows.

Copy this module to build your own pipeline: every step is a public vlmray stage.

    from vlmray.pipelines.curate import run
    result = run(CurateJobConfig(input="s3://raw/part-*.tar", output="s3://curated/v1"))
    result.stats["rows_out"], result.stats["stages"]

Output layout::

    <output>/shards/part-00000.tar ...   kept rows, in input order, shard_size each
    <output>/rejects/*.parquet           key, text, source, url, stage, reason, duplicate_of
    <output>/stats.json                  rows_in/out/rejected, per-stage in/kept/dropped/repaired
    <output>/_staging/rows/              pass 1: every row after the per-row stages, streamed to
                                         parquet (resume point; then removed)
    <output>/_staging/global/            the compact decisions of dedup / top fraction
    <output>/_job.json                   claims the folder: job "curate" and its settings

Two passes (:mod:`vlmray.data.curation.twopass`): pass 1 streams the per-row stages' output to
``_staging`` (a URL is downloaded once); the whole-dataset decisions read only the compact
columns of the staged live rows (row id, key, hashes, score); pass 2 streams the staged rows,
joins the decisions by row id, and the streamed writer turns the kept rows into shards.

Resuming: re-running with the same settings reuses ``_staging`` when it is complete and valid
(its ``_SUCCESS`` names every staged file with its size and rows, all there, readable, one type
per column; else it is rebuilt: :mod:`vlmray.data.curation.staging`) and skips shards already
written; the output is the same as an uninterrupted run's. Before Ray starts,
the output must be apart from the input (not it, not inside it, not holding it) and new, empty
or this curation's own (:mod:`vlmray.data.outputs`): a folder of stray shards or another
job's files is refused rather than counted, overwritten or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from vlmray.config import ConfigError
from vlmray.config.curation import IMAGE_SUFFIX
from vlmray.config.jobs import CurateJobConfig
from vlmray.data import schema
from vlmray.data.curation.accounting import (
    REJECT_COLUMNS,
    check_identity,
    count_batch,
    stage_stats,
)
from vlmray.data.curation.piece_writer import write_shards_streamed
from vlmray.data.curation.plan import apply_row_stages, global_stages, repair_stages, row_stages
from vlmray.data.curation.readers import READ_STAGE, list_inputs, read_inputs
from vlmray.data.curation.twopass import (
    decision_stages,
    global_decisions,
    read_staged,
    stage_once,
)
from vlmray.data.outputs import check_output, claim_output
from vlmray.data.placement import apply_budget, remote_args
from vlmray.data.storage import exists, filesystem, join, open_write, remove
from vlmray.data.synthetic import ensure_synthetic
from vlmray.embedders import scorer_for
from vlmray.runtime import init_ray

EXIT_AFTER_STAGING = "VLMRAY_TEST_EXIT_AFTER_STAGING"   # test hook: die once staging is written
JOB = "curate"


@dataclass
class Layout:
    root: str

    def __getattr__(self, name: str) -> str:
        parts = {"shards": "shards", "rejects": "rejects", "stats": "stats.json",
                 "job": "_job.json", "staging": "_staging", "staged": "_staging/_SUCCESS",
                 "decisions": "_staging/global"}
        if name not in parts:
            raise AttributeError(name)
        return join(self.root, parts[name])


@dataclass
class CurateResult:
    output: str
    stats: dict[str, Any] = field(default_factory=dict)


def fingerprint(job: CurateJobConfig) -> str:
    doc = {k: v for k, v in asdict(job).items() if k not in ("output", "keep_staging")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def _write_json(uri: str, doc: dict[str, Any]) -> None:
    with open_write(uri) as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def input_uri(job: CurateJobConfig) -> str:
    """The input to read: ``job.input``, or the generated built-in train split."""
    if job.input != "builtin":
        return job.input

    return join(ensure_synthetic(job.synthetic, join(job.output, "raw")), "train")


def plan(job: CurateJobConfig, uri: str):
    """The lazy per-row plan and its stages: read -> [download] -> text -> image -> [score]."""
    files = list_inputs(uri, job.read)
    urls = any(fmt == "urls" for _, fmt in files)
    stages = row_stages(job.curation(), download=job.download if urls else None,
                        scorer=scorer_for(job.score))
    rows = read_inputs(uri, job.read, job.placement)
    return apply_row_stages(rows, stages, job.placement), stages, len(files)


def staged_rows(job: CurateJobConfig, layout: Layout, uri: str) -> tuple[str, dict[str, Any]]:
    """Pass 1: the rows after the per-row stages, streamed to ``_staging`` (or found there
    from a previous run with the same settings); returns (their URI, the plan's metadata)."""
    ds, stages, n_files = plan(job, uri)
    meta = {"files_in": n_files, "stages": [s.name for s in stages],
            "repairs": repair_stages(stages)}
    if exists(layout.staged):
        print(f"[curate] reusing staged rows in {layout.staging} if they match", flush=True)
    staged = stage_once(lambda: ds, layout.staging, fingerprint=fingerprint(job))
    if os.environ.get(EXIT_AFTER_STAGING):
        os._exit(75)
    return staged, meta


def _batch_summary(table: pa.Table) -> dict[str, Any]:
    """What the writer's stream reports per batch: the accounting counts and, for the built-in
    data, rows and rejected rows per injected noise kind."""
    cols = [c for c in (schema.REJECT_REASON, schema.REJECT_STAGE, schema.REPAIRS)
            if c in table.column_names]
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in cols}
    counts = count_batch(batch)
    noise: dict[str, list[int]] = {}
    if schema.META in table.column_names:
        rejected = batch[schema.REJECT_REASON] != ""
        for meta, bad in zip(table[schema.META].to_pylist(), rejected):
            try:
                doc = json.loads(meta or "{}")
            except (TypeError, ValueError):
                continue
            if isinstance(doc, dict) and "noise" in doc:
                entry = noise.setdefault(doc["noise"] or "clean", [0, 0])
                entry[0], entry[1] = entry[0] + 1, entry[1] + int(bad)
    return {"counts": [[str(counts[k][i]) if k != "n" else int(counts[k][i])
                        for k in ("kind", "stage", "name", "n")]
                       for i in range(len(counts["n"]))], "noise": noise}


@dataclass
class _Totals:
    """The per-batch summaries, added up on the driver (small: counts, not rows)."""

    counts: Counter = field(default_factory=Counter)
    noise: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, summary: dict[str, Any]) -> None:
        for kind, stage, name, n in summary["counts"]:
            self.counts[(kind, stage, name)] += int(n)
        for kind, (rows, rejected) in summary["noise"].items():
            entry = self.noise.setdefault(kind, {"rows": 0, "rejected": 0})
            entry["rows"] += rows
            entry["rejected"] += rejected


def _check_output(job: CurateJobConfig, layout: Layout) -> dict[str, Any] | None:
    """The finished stats when this exact job already completed; fails on a different job."""
    fp = fingerprint(job)
    if exists(layout.job) and _read_json(layout.job).get("fingerprint") != fp:
        raise ConfigError(f"{job.output!r} holds a curation with different settings; "
                          "choose another --output")
    if exists(layout.stats):
        return _read_json(layout.stats)
    claim_output(job.output, JOB, fingerprint=fp, config=asdict(job))
    return None


def validate_job(job: CurateJobConfig) -> None:
    """Fails before any work: no output, an output over the input or holding other files, a
    missing input, a scoring model that won't load."""
    if not job.output:
        raise ConfigError("--output is required (a local path or s3:// URI)")
    check_output(job.output, [] if job.input == "builtin" else [job.input], job=JOB)
    if job.input != "builtin":
        list_inputs(job.input, job.read)
    row_stages(job.curation(), download=job.download,   # builds every stage's settings
               scorer=scorer_for(job.score))


def run(job: CurateJobConfig) -> CurateResult:
    """Runs (or resumes) the whole curation; fails loudly if in != out + rejected."""
    validate_job(job)
    layout, t0 = Layout(job.output), time.perf_counter()
    done = _check_output(job, layout)
    if done is not None:
        print(f"[curate] {job.output} is already complete", flush=True)
        return CurateResult(job.output, done)
    uri = input_uri(job)
    init_ray()
    apply_budget(job.placement)        # before any plan is built: datasets copy the context
    where = remote_args(job.placement, 1.0)
    staged, meta = staged_rows(job, layout, uri)
    t_staged = time.perf_counter()
    globals_ = global_stages(job.curation())
    decide = []
    if globals_:
        summary = global_decisions(None, globals_, layout.decisions, remote_args=where,
                                   fingerprint=fingerprint(job), staged=staged)
        decide = decision_stages(summary["decisions"], globals_)
    final = apply_row_stages(read_staged(staged), decide, job.placement)
    totals = _Totals()
    remove(layout.rejects)                      # a resumed run writes every reject again
    out = write_shards_streamed(final, layout.shards, job.write, IMAGE_SUFFIX[job.image.format],
                                summarize=_batch_summary, on_summary=totals.add,
                                rejects_uri=layout.rejects, reject_columns=REJECT_COLUMNS,
                                resources=where.get("resources"))
    read = [READ_STAGE] if any(s == READ_STAGE for _, s, _ in totals.counts) else []
    names = read + meta["stages"] + [g.name for g in globals_]   # "read": rows it refused
    stats = stage_stats(names, totals.counts, meta["repairs"])
    check_identity(stats["rows_in"], rows_out=out["rows_out"], rows_rejected=out["rows_rejected"],
                   where="curation output")
    check_identity(stats["rows_in"], rows_out=stats["rows_out"],
                   rows_rejected=stats["rows_rejected"], where="stage counts")
    stats.update({k: out[k] for k in ("rows_out", "shards", "shards_written", "shards_skipped")},
                 input=uri, output=job.output, format=job.write.format,
                 files_in=meta["files_in"], fingerprint=fingerprint(job),
                 stage_s=round(t_staged - t0, 2), wall_s=round(time.perf_counter() - t0, 2))
    if totals.noise:
        stats["builtin_noise"] = dict(sorted(totals.noise.items()))
    _write_json(layout.stats, stats)
    if not job.keep_staging:
        remove(layout.staging)
    return CurateResult(job.output, stats)


__all__ = ["CurateResult", "Layout", "fingerprint", "plan", "run"]
