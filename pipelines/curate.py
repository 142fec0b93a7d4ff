"""Curation pipeline: read -> [download] -> text -> image -> [score] -> dedup -> [top fraction]
-> write fixed-size shards, ``rejects/`` (a reason per row) and ``stats.json``.

Copy this module to build your own pipeline: every step is a public vlmray stage.

    from pipelines.curate import run
    result = run(CurateJobConfig(input="s3://raw/part-*.tar", output="s3://curated/v1"))
    result.stats["rows_out"], result.stats["stages"]

Output layout::

    <output>/shards/part-00000.tar ...   kept rows, in input order, shard_size each
    <output>/rejects/*.parquet           key, text, source, url, stage, reason, duplicate_of
    <output>/stats.json                  rows_in/out/rejected, per-stage in/kept/dropped/repaired
    <output>/_staging/                   validated rows before dedup (resume point; then removed)

Resuming: re-running with the same settings reuses ``_staging`` when it is complete and skips
shards already written; the output is the same as an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vlmray.api import init_ray
from vlmray.config import ConfigError
from vlmray.data import schema
from vlmray.data.curation.accounting import (
    check_identity,
    noise_report,
    stage_stats,
    tally,
)
from vlmray.data.curation.config import CurateJobConfig
from vlmray.data.curation.images import IMAGE_SUFFIX
from vlmray.data.curation.plan import (
    apply_global,
    apply_row_stages,
    global_stages,
    live_table,
    repair_stages,
    row_stages,
)
from vlmray.data.curation.readers import list_inputs, read_inputs
from vlmray.data.curation.writers import (
    SHARD,
    collect_rejects,
    existing_shards,
    write_shards,
)
from vlmray.data.storage import arrow_filesystem, exists, filesystem, join, open_write, remove

REJECT_COLUMNS = (schema.KEY, schema.TEXT, schema.URL, schema.SOURCE, schema.ROW_ID,
                  schema.REJECT_STAGE, schema.REJECT_REASON, schema.DUPLICATE_OF, schema.REPAIRS)
REJECTS_PER_FILE = 1_000_000
EXIT_AFTER_STAGING = "VLMRAY_TEST_EXIT_AFTER_STAGING"   # test hook: die once staging is written


@dataclass
class Layout:
    root: str

    def __getattr__(self, name: str) -> str:
        parts = {"shards": "shards", "rejects": "rejects", "stats": "stats.json",
                 "job": "_job.json", "staging": "_staging", "staged": "_staging/_SUCCESS"}
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
    from vlmray.data.synthetic import ensure_synthetic

    return join(ensure_synthetic(job.synthetic, join(job.output, "raw")), "train")


def plan(job: CurateJobConfig, uri: str):
    """The lazy per-row plan and its stages: read -> [download] -> text -> image -> [score]."""
    files = list_inputs(uri, job.read)
    urls = any(fmt == "urls" for _, fmt in files)
    stages = row_stages(job.curation(), download=job.download if urls else None)
    return apply_row_stages(read_inputs(uri, job.read), stages), stages, len(files)


def staged_rows(job: CurateJobConfig, layout: Layout, uri: str):
    """Rows after the per-row stages, from ``_staging`` when a previous run completed it."""
    import ray.data

    fs, path = arrow_filesystem(layout.staging)
    if exists(layout.staged) and _read_json(layout.staged).get("fingerprint") == fingerprint(job):
        print(f"[curate] reusing staged rows in {layout.staging}", flush=True)
        return ray.data.read_parquet(path, filesystem=fs).materialize(), _read_json(layout.staged)
    remove(layout.staging)
    ds, stages, n_files = plan(job, uri)
    staged = ds.materialize()
    staged.write_parquet(path, filesystem=fs)
    meta = {"fingerprint": fingerprint(job), "files_in": n_files,
            "stages": [s.name for s in stages], "repairs": repair_stages(stages)}
    _write_json(layout.staged, meta)
    if os.environ.get(EXIT_AFTER_STAGING):
        os._exit(75)
    return staged, meta


def write_kept(final, job: CurateJobConfig, layout: Layout) -> dict[str, Any]:
    """Fixed-size shards of the kept rows; shards already on storage are skipped."""
    kept_ids = live_table(final, [])[schema.ROW_ID]
    size = job.write.shard_size
    n_shards = -(-len(kept_ids) // size)
    have = set(existing_shards(layout.shards))
    todo = [i for i in range(n_shards) if job.write.shard_name(i) not in have]
    written = write_shards(final, kept_ids, todo, layout.shards, job.write,
                           IMAGE_SUFFIX[job.image.format]) if todo else []
    wrote = {int(r[SHARD]): int(r["rows"]) for r in written if r["written"]}
    for i, n in wrote.items():
        expected = min(size, len(kept_ids) - i * size)
        if n != expected:
            raise RuntimeError(f"shard {i} got {n} rows, expected {expected}")
    return {"rows_out": int(len(kept_ids)), "shards": n_shards, "shards_written": len(wrote),
            "shards_skipped": n_shards - len(todo)}


def write_rejects(final, layout: Layout) -> int:
    """Rejected rows (no images), in ``ROW_ID`` order, to ``rejects/rejects-00000.parquet``...;
    returns the number of rows written."""
    import pyarrow.parquet as pq

    remove(layout.rejects)
    table = collect_rejects(final, [c for c in REJECT_COLUMNS if c in final.columns()])
    for i, start in enumerate(range(0, table.num_rows, REJECTS_PER_FILE)):
        with open_write(join(layout.rejects, f"rejects-{i:05d}.parquet"), "wb") as f:
            pq.write_table(table.slice(start, REJECTS_PER_FILE), f, compression="zstd")
    return table.num_rows


def _check_output(job: CurateJobConfig, layout: Layout) -> dict[str, Any] | None:
    """The finished stats when this exact job already completed; fails on a different job."""
    fp = fingerprint(job)
    if exists(layout.job) and _read_json(layout.job).get("fingerprint") != fp:
        raise ConfigError(f"{job.output!r} holds a curation with different settings; "
                          "choose another --output")
    if exists(layout.stats):
        return _read_json(layout.stats)
    _write_json(layout.job, {"fingerprint": fp, "config": asdict(job)})
    return None


def validate_job(job: CurateJobConfig) -> None:
    """Fails before any work: no output, a missing input, a scoring model that won't load."""
    if not job.output:
        raise ConfigError("--output is required (a local path or s3:// URI)")
    if job.input != "builtin":
        list_inputs(job.input, job.read)
    row_stages(job.curation(), download=job.download)   # builds every stage's settings


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
    staged, meta = staged_rows(job, layout, uri)
    t_staged = time.perf_counter()
    globals_ = global_stages(job.curation())
    final = apply_global(staged, globals_).materialize()
    names = meta["stages"] + [g.name for g in globals_]
    stats = stage_stats(names, tally(final), meta["repairs"])
    noise = noise_report(final)
    out = write_kept(final, job, layout)
    rejected = write_rejects(final, layout)
    check_identity(stats["rows_in"], rows_out=out["rows_out"], rows_rejected=rejected,
                   where="curation output")
    check_identity(stats["rows_in"], rows_out=stats["rows_out"],
                   rows_rejected=stats["rows_rejected"], where="stage counts")
    stats.update(out, input=uri, output=job.output, format=job.write.format,
                 files_in=meta.get("files_in"), fingerprint=fingerprint(job),
                 stage_s=round(t_staged - t0, 2), wall_s=round(time.perf_counter() - t0, 2))
    if noise:
        stats["builtin_noise"] = noise
    _write_json(layout.stats, stats)
    if not job.keep_staging:
        remove(layout.staging)
    return CurateResult(job.output, stats)


__all__ = ["CurateResult", "Layout", "fingerprint", "plan", "run"]
