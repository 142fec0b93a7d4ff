"""The training feed of a run, per source: each worker's lane in the exact epoch order
(:mod:`vlmray.pipelines.lanes`, the default), or Ray Train datasets in Ray's order (``data.cache``,
or several sources mixed in one stream); with the ingest summary once training has read.

Fails before Ray Train starts when a source yields no accepted row (:func:`check_accepted`).

    feed = training_feed(cfg, run_dir, train_uris, retrieval_plan)
    trainer = build_trainer(cfg, feed.datasets, ..., source_sizes=feed.sizes, feeds=feed.feeds)
    ...
    summary = feed.summary()          # after training: each input row counted once
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmray.config import Config, ConfigError
from vlmray.data.augment import augment_train
from vlmray.data.order import Item
from vlmray.data.storage import join
from vlmray.data.stream import stream_summary
from vlmray.pipelines.feed import run_ingest, stream_ingest
from vlmray.pipelines.lanes import plan_feed
from vlmray.train.streams import dataset_name


@dataclass
class TrainingFeed:
    """``feeds`` (lanes, one per source) or ``datasets`` (Ray Train's); ``sizes``: rows per
    source for single-source sampling (None: one stream); ``summary()``: the ingest counts."""

    datasets: dict[str, Any]
    feeds: list[Any] | None
    sizes: list[int] | None
    summary: Callable[[], dict[str, Any]]
    lanes: bool


def uses_lanes(cfg: Config, n_sources: int) -> bool:
    """Whether the run reads in the exact epoch order: always, but for the in-memory cache and
    for several sources mixed in one stream (their rows interleave in Ray's order)."""
    return not cfg.data.cache and (n_sources == 1 or cfg.data.sampling == "single_source")


def training_feed(cfg: Config, run_dir: str, train_uris: list[str], plan: Any) -> TrainingFeed:
    """Plans every source's feed (what must run once runs now) and checks it yields rows."""

    kwargs = [{"rejects_uri": join(run_dir, rejects_dir(k)),
               "cache_root": join(run_dir, "curation" if k == 0 else f"curation-{k}"),
               "retrieval": plan.stages if plan and k == 0 else None}
              for k in range(len(train_uris))]
    if uses_lanes(cfg, len(train_uris)):
        return _lane_feed(cfg, run_dir, train_uris, kwargs)
    if cfg.data.cache:
        ingests = [run_ingest(cfg.data, uri, **kw) for uri, kw in zip(train_uris, kwargs)]
        check_accepted(cfg, run_dir, [i.rows_accepted > 0 for i in ingests],
                       lambda: [i.summary() for i in ingests])
        done = ingest_summary(cfg, [i.summary() for i in ingests])
        print(f"[vlmray] ingest (cached in memory): {done}", flush=True)
        datasets, sizes = _train_datasets(cfg, [i.train for i in ingests],
                                          [i.rows_accepted for i in ingests])
        return TrainingFeed(datasets, None, sizes, lambda: done, lanes=False)
    streams = [stream_ingest(cfg.data, uri, **kw) for uri, kw in zip(train_uris, kwargs)]
    trains = [train for train, _ in streams]
    # One row is enough to know a source yields any: the peek reads until the first accepted
    # row (every row only when all are rejected); the tally counts each row once all the same.
    check_accepted(cfg, run_dir, [bool(t.limit(1).take(1)) for t in trains],
                   lambda: [stream_summary(tally) for _, tally in streams])
    # here only several sources mixed in one stream (single-source sampling reads lanes)
    print("[vlmray] ingest: streaming in Ray's order (counts follow training)", flush=True)
    datasets, _ = _train_datasets(cfg, trains, [0] * len(trains))
    return TrainingFeed(datasets, None, None,
                        _summary_of(cfg, [tally for _, tally in streams]), lanes=False)


def _lane_feed(cfg: Config, run_dir: str, train_uris: list[str],
               kwargs: list[dict[str, Any]]) -> TrainingFeed:

    feeds = [plan_feed(cfg.data, uri, **kw) for uri, kw in zip(train_uris, kwargs)]
    check_accepted(cfg, run_dir, [_yields_rows(f, cfg.train.seed) for f in feeds],
                   lambda: [stream_summary(f.tally) for f in feeds])
    sizes = [f.rows for f in feeds] if cfg.data.sampling == "single_source" else None
    print(f"[vlmray] ingest: streaming in the exact epoch order ("
          f"{', '.join(f'{len(f.units)} units of <= {f.units[0].rows} rows' for f in feeds)};"
          f" counts follow training)", flush=True)
    return TrainingFeed({}, feeds, sizes, _summary_of(cfg, [f.tally for f in feeds]),
                        lanes=True)


def _yields_rows(feed: Any, seed: int) -> bool:
    """Whether a source yields any accepted row: a peek at its first unit, then its first 16,
    then all of them, so it reads only as far as it must (the tally counts each row it reads
    once all the same)."""

    n = len(feed.units)
    for k in sorted({1, min(16, n), n}):
        items = [(i, Item(i)) for i in range(k)]
        if feed.lane_plan(items, epoch=0, seed=seed).limit(1).take(1):
            return True
    return False


def _summary_of(cfg: Config, tallies: list[Any]) -> Callable[[], dict[str, Any]]:

    def summary() -> dict[str, Any]:
        s = ingest_summary(cfg, [stream_summary(tally) for tally in tallies])
        print(f"[vlmray] ingest (streamed): {s}", flush=True)
        return s

    return summary


def check_accepted(cfg: Config, run_dir: str, nonempty: list[bool],
                    summaries: Callable[[], list[dict[str, Any]]]) -> None:
    """Raises ``ConfigError`` (before Ray Train starts) for the first source whose every row
    was rejected, with its counts by reason and where the rejected rows are."""
    if all(nonempty):
        return
    k = nonempty.index(False)
    s = summaries()[k]
    spec = [cfg.data.source, *cfg.data.extra_sources][k]
    raise ConfigError(
        f"every row of the training source {spec!r} was rejected ({s['rows_in']} rows in, "
        f"by reason: {s['reject_reasons']}; the rows are in {join(run_dir, rejects_dir(k))}): "
        f"nothing to train on. Fix the data, or loosen the settings that reject its rows "
        f"(data.min_image_side, data.max_text_chars, data.curation.*)")


def rejects_dir(k: int) -> str:
    """Where source k's rejected rows are written: ``rejects`` (k = 0), ``rejects-<k>``."""
    return "rejects" if k == 0 else f"rejects-{k}"


def ingest_summary(cfg: Config, per: list[dict[str, Any]]) -> dict[str, Any]:
    """One source: its ingest summary. Several: the totals over all sources (reasons summed)
    and ``sources``, each source's own summary with its spec and rejects directory."""
    if len(per) == 1:
        return per[0]
    reasons: dict[str, int] = {}
    for s in per:
        for reason, n in s["reject_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    specs = [cfg.data.source, *cfg.data.extra_sources]
    return {**{k: sum(s[k] for s in per) for k in ("rows_in", "rows_accepted", "rows_rejected")},
            "reject_reasons": reasons,
            "sources": [{"source": spec, "rejects": rejects_dir(k), **s}
                        for k, (spec, s) in enumerate(zip(specs, per))]}


def _train_datasets(cfg: Config, trains: list[Any],
                    sizes: list[int]) -> tuple[dict[str, Any], list[int] | None]:
    """The Ray Train datasets, each with the per-epoch random stages, and the source sizes
    single-source sampling draws by (None when all rows form one stream)."""

    if cfg.data.sampling == "single_source":
        return ({dataset_name(k): augment_train(cfg.data, ds) for k, ds in enumerate(trains)},
                sizes)
    stream = trains[0].union(*trains[1:]) if len(trains) > 1 else trains[0]
    return {dataset_name(0): augment_train(cfg.data, stream)}, None


__all__ = ["TrainingFeed", "check_accepted", "ingest_summary", "rejects_dir", "training_feed",
           "uses_lanes"]
