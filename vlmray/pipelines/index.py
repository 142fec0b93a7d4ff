"""Index pipeline: read -> [reference split] -> embed (Ray Data actors) -> embedding shards
-> FAISS index per modality (trained once, filled in parallel Ray tasks, merged, auto-tuned).

``jobs/build_index.py`` runs it, and so does a training run whose ``data.retrieval`` builds its
own index (:mod:`vlmray.pipelines.retrieval`).

    from vlmray.pipelines.index import load_built, run
    stats = run(IndexJobConfig(input="s3://curated/v1", output="s3://index/v1",
                               embed=EmbedConfig(model="s3://runs/clip", modality="both")))
    scores, keys = load_built("s3://index/v1", "image").search(queries, k=10)

Output layout::

    <output>/raw/                        the built-in dataset (input == "builtin" only)
    <output>/embeddings/part-*.parquet   key, text, image_embed / text_embed (fixed-size lists)
    <output>/rejects/rejects.parquet     key, reject_stage, reject_reason (e.g. decode_error)
    <output>/index/image/, index/text/   index.faiss, keys.parquet, report.json (BuiltIndex)
    <output>/stats.json                  rows in/embedded/rejected/outside subset, per index
    <output>/_job.json                   claims the folder for index jobs (a re-run replaces)

The output must be apart from the input and new, empty or an earlier index job's
(:mod:`vlmray.data.outputs`), checked before Ray starts; a re-run's embeddings are written
under ``_incoming/`` and replace the old ones only once complete.

Every input row is embedded, rejected with a reason, or outside the chosen subset; the run
checks rows_in == rows_embedded + rows_rejected + rows_outside_subset.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config import ConfigError
from vlmray.config.jobs import IndexJobConfig
from vlmray.data import schema
from vlmray.data.curation.readers import list_inputs, read_inputs
from vlmray.data.curation.stage import apply_stage
from vlmray.data.outputs import check_output, claim_output
from vlmray.data.storage import filesystem, join, publish, remove, write_bytes_atomic
from vlmray.retrieval.build import build_sharded
from vlmray.retrieval.embed import (
    EMBED_COLUMNS,
    EmbedStage,
    embedding_files,
    read_embeddings,
    write_embeddings,
)
from vlmray.retrieval.index import BuiltIndex
from vlmray.retrieval.split import OUTSIDE_SUBSET, SubsetStage
from vlmray.runtime import init_ray

MODALITIES = {"image": schema.IMAGE_EMBED, "text": schema.TEXT_EMBED}   # index -> its column
JOB = "index"
INCOMING = "_incoming"


def input_uri(job: IndexJobConfig) -> str:
    """The shards to read: ``<input>/shards`` or ``<input>/train`` when there, else ``input``;
    ``builtin`` generates the built-in dataset first."""
    if job.input == "builtin":
        from vlmray.data.synthetic import ensure_synthetic

        return join(ensure_synthetic(job.synthetic, join(job.output, "raw")), "train")
    fs, path = filesystem(job.input)
    if not any(c in job.input for c in "*?[") and fs.isdir(path):
        for sub in ("shards", "train"):
            if fs.isdir(f"{path.rstrip('/')}/{sub}"):
                return join(job.input, sub)
    return job.input


def validate_job(job: IndexJobConfig) -> EmbedStage:
    """Fails before any work: no output, an output over the input or holding other files, no
    model, a model that won't load, missing input."""
    if not job.output:
        raise ConfigError("--output is required (a local path or s3:// URI)")
    check_output(job.output, [] if job.input == "builtin" else [job.input], job=JOB)
    if not job.embed.model:
        raise ConfigError("--embed.model is required: a vlmray run or checkpoint directory "
                          "(local or s3://), hf:<dir> or minilm (text only)")
    stage = EmbedStage(job.embed)
    if job.input != "builtin":
        list_inputs(input_uri(job), job.read)
    return stage


def _shards(uri: str, column: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One shard per embedding file, or the rows (in file order) cut into ``count`` shards."""
    files = [read_embeddings(f, column) for f in embedding_files(uri)]
    if not count:
        return [(v, k) for k, v in files]
    keys = np.concatenate([k for k, _ in files])
    vectors = np.concatenate([v for _, v in files])
    cuts = np.array_split(np.arange(len(keys)), min(count, len(keys)))
    return [(vectors[c[0]:c[-1] + 1], keys[c[0]:c[-1] + 1]) for c in cuts]


def _build(job: IndexJobConfig, modality: str) -> dict[str, Any]:
    shards = _shards(join(job.output, "embeddings"), MODALITIES[modality], job.shards)
    built = build_sharded(shards, job.index, parallel=len(shards),
                          queries_holdout=job.holdout_queries)
    uri = join(job.output, "index", modality)
    built.save(uri)
    print(f"[index] {modality}: {built.report['kind']} over {built.report['n']} x "
          f"{built.report['dim']}, recall@10 {built.report['recall_at_10']:.3f}", flush=True)
    return {**built.report, "uri": uri}


def _rows_on_disk(uri: str) -> int:
    """Rows in the embedding files under ``uri``, from their parquet footers."""
    total = 0
    for file in embedding_files(uri):
        fs, path = filesystem(file)
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _write_rejects(output: str, rejects: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(rejects, buf, compression="zstd")
    write_bytes_atomic(join(output, "rejects", "rejects.parquet"), buf.getvalue())


def _embed(job: IndexJobConfig, stage: EmbedStage, uri: str) -> dict[str, Any]:
    """read -> [subset] -> embed -> ``<output>/embeddings``, written under ``_incoming/`` and
    published only once every row is accounted for (a failed run keeps the old ones);
    returns the counts for stats.json."""
    ds = read_inputs(uri, job.read)
    if job.subset != "all":
        ds = apply_stage(ds, SubsetStage(job.subset, job.reference_fraction, job.split_seed))
    ds = apply_stage(ds, stage)
    incoming = join(job.output, INCOMING)
    remove(incoming)                             # a failed run's partial output, never read
    staged = join(incoming, "embeddings")
    written = write_embeddings(ds, staged, columns=EMBED_COLUMNS[job.embed.modality])
    why = np.asarray(written.rejects.column(schema.REJECT_REASON).to_pylist(), dtype=object)
    reasons = Counter(why.tolist())
    outside = reasons.pop(OUTSIDE_SUBSET, 0)
    rejected = written.rejects.filter(why != OUTSIDE_SUBSET)
    on_disk = _rows_on_disk(staged) if written.rows_written else 0
    if written.rows_in != on_disk + rejected.num_rows + outside or on_disk != written.rows_written:
        raise RuntimeError(f"rows_in {written.rows_in} != embedded {on_disk} + rejected "
                           f"{rejected.num_rows} + outside subset {outside}")
    if not on_disk:
        raise RuntimeError(f"no rows to index: {written.rows_in} in, rejected: {dict(reasons)}, "
                           f"outside subset: {outside}")
    publish(staged, join(job.output, "embeddings"))
    remove(incoming)
    _write_rejects(job.output, rejected)
    return {"rows_in": written.rows_in, "rows_embedded": on_disk,
            "rows_rejected": rejected.num_rows, "reject_reasons": dict(reasons),
            "rows_outside_subset": outside, "subset": job.subset,
            "embedding_files": len(written.files)}


def run(job: IndexJobConfig) -> dict[str, Any]:
    """Embeds and indexes; returns (and writes) the stats. Fails loudly if rows go missing."""
    stage, t0 = validate_job(job), time.perf_counter()
    claim_output(job.output, JOB)
    uri = input_uri(job)
    init_ray()
    counts = _embed(job, stage, uri)
    t_embed = time.perf_counter()
    indexes = {m: _build(job, m) for m in job.modalities}
    stats = {"input": uri, "output": job.output, **counts, "indexes": indexes,
             "embed_s": round(t_embed - t0, 2), "wall_s": round(time.perf_counter() - t0, 2),
             "config": asdict(job)}
    write_bytes_atomic(join(job.output, "stats.json"), json.dumps(stats, indent=2).encode())
    return stats


def load_built(output: str, modality: str) -> BuiltIndex:
    """The ``modality`` (``image``/``text``) index of a finished run, from local or s3://."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r}; valid choices: {list(MODALITIES)}")
    return BuiltIndex.load(join(output, "index", modality))


__all__ = [ "input_uri", "load_built", "run", "validate_job"]
