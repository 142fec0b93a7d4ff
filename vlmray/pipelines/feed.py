"""The training feed on Ray Data: one lazy plan from shards (webdataset or parquet, local or
s3://) or URL lists to training rows, streamed: read -> [download] -> [curation stages and
their decisions] -> [rewrite] -> [retrieval] -> decode + validate + tokenise -> split (count,
write rejects, keep the accepted rows' training columns).

Nothing holds the rows: training consumes the plan as a stream, every epoch, and memory is
bounded by Ray Data's settings (block size, prefetch, operator concurrency, the object-store
budget of ``data.placement``), never by the number of rows. ``data.curate``'s whole-dataset
decisions (dedup, keep-top-fraction) run in two passes over compact columns
(:mod:`vlmray.data.curation.twopass`); their pass 1 is cached under ``cache_root``.

Every row is accounted for: rows in = accepted + rejected, by reason, each input row counted
once however many epochs read it (:class:`vlmray.data.stream.StreamTally`); rejected rows are
written to ``rejects/`` once.

This module composes stages of several layers (data, rewrite, the scoring model of
``vlmray.embedders``, retrieval's), so it sits above all of them.

    train, tally = stream_ingest(cfg.data, "s3://bucket/ds/train", rejects_uri="runs/x/rejects",
                                 cache_root="runs/x/curation")       # lazy; training iterates
    result = run_ingest(cfg.data, uri)   # the in-memory cache (data.cache): small data only
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmray.config.inputs import ReadConfig
from vlmray.data.curation.download import DownloadStage
from vlmray.data.curation.plan import apply_row_stages, global_stages, row_stages
from vlmray.data.curation.readers import list_inputs
from vlmray.data.curation.stage import Stage
from vlmray.data.curation.twopass import (
    decision_stages,
    fingerprint,
    global_decisions,
    inputs_fingerprint,
    read_staged,
    stage_once,
)
from vlmray.data.ingest import DECODE_CPUS, SPLIT_CPUS, DecodeStage, read_shards, train_columns
from vlmray.data.placement import remote_args
from vlmray.data.storage import join
from vlmray.data.stream import FALLBACK_COLUMNS, SplitStage, StreamTally, stream_summary
from vlmray.embedders import scorer_for
from vlmray.rewrite.stage import rewrite_plan

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig

@dataclass
class Source:
    """The rows of a training source: ``read()`` builds their lazy plan, ``stages`` follow it;
    ``staged`` is where a URL list's rows were staged (read those files instead), or ""."""

    read: Callable[[], ray.data.Dataset]
    stages: list[Stage]
    staged: str = ""


def source_plan(cfg: DataConfig, uri: str, cache_root: str) -> Source:
    """The :class:`Source` of the rows of ``uri``, running what must run once first:

    - a URL list (img2dataset-style csv/tsv/jsonl/parquet) is downloaded once: pass 1 streams
      read -> download -> [curation row stages] to parquet under ``<cache_root>/staged`` and
      every epoch reads that back, never fetching an image twice;
    - ``data.curate``'s whole-dataset decisions (dedup, keep-top-fraction) run in two passes
      over compact columns (:func:`vlmray.data.curation.twopass.global_decisions`), cached in
      ``cache_root`` by a fingerprint of the inputs and settings, so a re-run skips pass 1.
    """
    files = list_inputs(uri, ReadConfig())
    urls = any(fmt == "urls" for _, fmt in files)
    cur, where = cfg.curation, cfg.placement
    globals_ = global_stages(cur) if cfg.curate else []
    rows = (row_stages(cur, download=cur.download if urls else None,
                       scorer=scorer_for(cur.score)) if cfg.curate
            else [DownloadStage(cur.download)] if urls else [])
    fp = fingerprint(cur if cfg.curate else cur.download, cfg.curate,
                     inputs_fingerprint(files))
    if urls:
        staged = stage_once(lambda: apply_row_stages(read_shards(uri, where), rows, where),
                            join(cache_root, "staged"), fingerprint=fp)
        read, rows = (lambda: read_staged(staged)), []
    else:
        staged, read = "", (lambda: read_shards(uri, where))
    if not globals_:
        return Source(read, rows, staged)
    summary = global_decisions(lambda: apply_row_stages(read(), rows, where), globals_,
                               cache_root, fingerprint=fp, staged=staged,
                               remote_args=remote_args(where, 1.0))
    return Source(read, [*rows, *decision_stages(summary["decisions"], globals_)], staged)


def build_ingest(cfg: DataConfig, uri: str, *, retrieval: list | None = None,
                 source: Source | None = None) -> ray.data.Dataset:
    """Lazy plan: read -> [curation stages and their decisions: ``source``, from
    :func:`source_plan`] -> [rewrite / caption stages] -> [retrieval stages] ->
    decode/validate/tokenise. Rows carry REJECT_REASON ("" = kept) and REJECT_STAGE.
    ``retrieval`` is the list of stages :func:`vlmray.pipelines.retrieval.prepare` returns for
    ``data.retrieval``; ``data.rewrite`` adds TEXTS_AUG, REWRITE_FALLBACKS, SYNTHETIC_CAPTION and
    CAPTION_FALLBACK to every row (:func:`vlmray.rewrite.stage.rewrite_plan`)."""
    where = cfg.placement
    source = source or Source(lambda: read_shards(uri, where), [])
    rows = apply_row_stages(source.read(), source.stages, where)
    if cfg.rewrite.enabled:
        rows = rewrite_plan(rows, cfg.rewrite)
    if retrieval:
        rows = apply_row_stages(rows, retrieval, where)
    return rows.map_batches(DecodeStage(cfg), batch_format="numpy", batch_size=256,
                            **remote_args(where, DECODE_CPUS))


def stream_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
                  retrieval: list | None = None,
                  cache_root: str | None = None) -> tuple[ray.data.Dataset, Any]:
    """(lazy training dataset of ``train_columns(cfg)``, the tally actor). Only
    what must run once runs now (:func:`source_plan`: a URL list's download, ``data.curate``'s
    pass 1, unless cached in ``cache_root``, default ``<rejects_uri>/../curation``); the rows
    flow when training iterates."""
    import ray

    source = source_plan(cfg, uri, cache_root or _default_cache(rejects_uri))
    tally = ray.remote(num_cpus=0)(StreamTally).remote()
    split = SplitStage(tally, rejects_uri, train_columns(cfg))
    train = build_ingest(cfg, uri, retrieval=retrieval, source=source).map_batches(
        split, batch_format="numpy", batch_size=256, **remote_args(cfg.placement, SPLIT_CPUS))
    return train, tally


def _default_cache(rejects_uri: str | None) -> str:
    if rejects_uri:
        return join(rejects_uri.rstrip("/").rsplit("/", 1)[0], "curation")
    import tempfile

    return tempfile.mkdtemp(prefix="vlmray-curation-")


@dataclass
class IngestResult:
    train: ray.data.Dataset
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, dict[str, int]] = field(default_factory=dict)
    """``rewrite_fallbacks`` / ``caption_fallbacks`` (reason -> count, ``kept`` included) when
    ``data.rewrite`` ran as a prefix (:class:`vlmray.data.stream.StreamTally`)."""

    def summary(self) -> dict[str, object]:
        return {"rows_in": self.rows_in, "rows_accepted": self.rows_accepted,
                "rows_rejected": self.rows_rejected, "reject_reasons": dict(self.reject_reasons),
                **{k: dict(v) for k, v in self.fallbacks.items()}}


def run_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
               retrieval: list | None = None, cache_root: str | None = None) -> IngestResult:
    """The in-memory cache (``data.cache``): streams the plan once and holds the accepted
    training rows in Ray's object store, so later epochs read them from memory. Only for data
    small enough to hold; the counts are complete on return."""
    train, tally = stream_ingest(cfg, uri, rejects_uri=rejects_uri, retrieval=retrieval,
                                 cache_root=cache_root)
    train = train.materialize()
    s = stream_summary(tally)
    if train.count() != s["rows_accepted"]:
        raise RuntimeError(f"ingest: {train.count()} rows held != {s['rows_accepted']} accepted")
    fallbacks = {k: s[k] for k in FALLBACK_COLUMNS.values() if k in s}
    return IngestResult(train, s["rows_in"], s["rows_accepted"], s["rows_rejected"],
                        s["reject_reasons"], fallbacks)


__all__ = ["IngestResult", "Source", "build_ingest", "run_ingest", "source_plan", "stream_ingest"]
