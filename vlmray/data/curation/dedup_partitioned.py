"""Dedup's decisions as many bounded-memory tasks over the compact table (SCALE.md, issue 16).

:meth:`Dedup.decide` holds the whole compact table in one task: at a billion rows that is
~56 GB. This module reaches the *same* decisions (the same rejected rows, reasons and
``duplicate_of``) in P partitions, each one Ray task, so no task holds more than one partition
and the driver holds only file names and counts.

Storage is a shuffle through parquet under a scratch directory: a task writes one *scatter
file* whose rows are grouped by destination partition (column ``_part``, one row group per
partition, statistics on ``_part`` only), and the task of partition q opens every file of the
step and reads only q's row groups (:func:`scatter`, :func:`gather`).

    split    groups of compact files (~n/P rows) -> live rows, scattered by the first rule's value
    keys, exact, captions (by signature): one task per partition. Every row of one value is in
             one partition (a stable hash of the value; rows without one spread by ROW_ID), so
             "first row by ROW_ID keeps" is decided there exactly as over the whole table. The
             task writes its rejections and scatters only the survivors, with only the columns
             later rules read, by the next rule's value: a row an earlier rule rejected is
             never seen by a later one.
    near     values  per phash partition: the distinct hashes with their first row (ROW_ID, KEY)
                     -> band records, scattered by band key
             bands   per band partition: close_pairs among hashes sharing a band key (multi-index
                     hashing, exact by pigeonhole: :func:`~vlmray.data.curation.dedup.band_masks`)
             resolve ONE task over the pair graph only (proportional to near-duplicate pairs,
                     not rows): :func:`~vlmray.data.curation.dedup._earliest_kept` in the order of
                     the hashes' first rows; each dropped hash -> its earliest kept neighbour
             apply   per phash partition: a row of a dropped hash names that neighbour's first
                     row; another row of a kept hash names the hash's own first row (rows
                     sharing one hash are resolved together, as in ``near_duplicates``)
    regroup  per group of input files (index mod P): the rejections -> ``file-<index>.parquet``

A distinct hash goes to the band step once per *route*, not once per band key: a route is the
leading blocks of a key (enough bits to spread hashes over P partitions), and a band task
searches every key of its route, so the shuffle is (routes x distinct hashes) records. A key
shorter than that (a large ``phash_threshold``) spreads over fewer partitions; such keys make
~n^2 / 2^bits candidates, which one task could not search either.

Not partitioned: caption Jaccard (``caption_jaccard > 0``) runs in ONE task over the
survivors' ``(ROW_ID, KEY, TEXT_SIG, TEXT)``: its LSH candidates would split by band, but the
row-by-row recount of :func:`~vlmray.data.curation.dedup.repeated_captions` (a row's fate
depends on the kept rows of every similar caption, transitively) does not. Nor is a stage after
dedup in the global step (keep-top-fraction's exact quantile): :func:`decide_stored` runs it in
one task over ``ROW_ID`` and its own columns (16 B/row for the score), less dedup's rejections.

    summary = decide_uri(Dedup(DedupConfig(partitions=64)), compact_uri, decisions_root)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.curation import DedupConfig
from vlmray.data import schema
from vlmray.data.curation.dedup import (
    DUPLICATE_IMAGE,
    DUPLICATE_KEY,
    NEAR_DUPLICATE_IMAGE,
    REPEATED_CAPTION,
    _by_first_occurrence,
    first_of_group,
    repeated_captions,
)
from vlmray.data.curation.dedup_near import near_pairs
from vlmray.data.curation.scatter import (
    UP_KEY,
    VALUE,
    Runner,
    compact_files,
    file_groups,
    gather,
    partition_of,
    ray_runner,
    run_local,
    scatter,
    split_task,
    to_batch,
    to_table,
)
from vlmray.data.curation.stage import Batch, Decisions, GlobalStage
from vlmray.data.curation.twopass import FILES_INDEX, FileDecisions, file_index, write_decisions
from vlmray.data.storage import arrow_filesystem, filesystem, join, open_write, remove

if TYPE_CHECKING:
    from vlmray.data.curation.dedup import Dedup

ROWS_PER_PARTITION = 5_000_000
"""``DedupConfig.partitions = 0``: one partition per this many compact rows (a few hundred MB)."""

# --- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One duplicate rule of :class:`Dedup`, as the partitioned plan runs it."""

    reason: str
    column: str
    """Its value: every row of one value meets in one partition."""
    reads: tuple[str, ...]
    """What it reads besides ``ROW_ID`` and ``KEY``."""
    whole: bool = False
    """Runs as one task over all the rows that reach it (caption Jaccard)."""


def rules(cfg: DedupConfig) -> list[Rule]:
    """The rules ``cfg`` switches on, in :meth:`Dedup.decide`'s order."""
    jaccard = cfg.caption_jaccard > 0
    on = [(cfg.keys, Rule(DUPLICATE_KEY, schema.KEY, ())),
          (cfg.exact, Rule(DUPLICATE_IMAGE, schema.SHA256, (schema.SHA256,))),
          (cfg.near, Rule(NEAR_DUPLICATE_IMAGE, schema.PHASH, (schema.PHASH,))),
          (cfg.captions, Rule(REPEATED_CAPTION, schema.TEXT_SIG,
                              (schema.TEXT_SIG, *([schema.TEXT] if jaccard else [])),
                              whole=jaccard))]
    return [r for ok, r in on if ok]


@dataclass(frozen=True)
class Round:
    """What a task of one rule needs (shipped to every task of the round)."""

    rule: Rule
    cfg: DedupConfig
    parts: int
    out: str
    """Its scratch directory: ``rows/`` (survivors), ``decisions/``."""
    then: str | None
    """The next rule's column (its survivors are scattered by it); None after the last rule."""
    keep: tuple[str, ...]
    """The columns later rules read (all the survivors carry besides ``ROW_ID`` and ``KEY``)."""

    def columns(self) -> list[str]:
        return list(dict.fromkeys([schema.ROW_ID, schema.KEY, *self.rule.reads, *self.keep]))


def _rejects(step: Round, rows: Batch, dropped: Batch | None) -> tuple[np.ndarray, np.ndarray]:
    """(rejected?, duplicate_of) per row of one partition, in ``ROW_ID`` order: the rule's
    decision exactly as :meth:`Dedup.decide` makes it over the whole table."""
    keys, rule, cfg = rows[schema.KEY], step.rule, step.cfg
    if rule.reason == NEAR_DUPLICATE_IMAGE:
        return _near_rejects(rows[schema.PHASH], keys, dropped)
    if rule.reason == REPEATED_CAPTION:
        parent = repeated_captions(rows[schema.TEXT_SIG], cfg.max_caption_repeats,
                                   texts=rows.get(schema.TEXT), jaccard=cfg.caption_jaccard,
                                   shingle=cfg.caption_shingle,
                                   normaliser=cfg.caption_normaliser)
    else:
        parent = first_of_group(rows[rule.column])
    return parent >= 0, keys[np.maximum(parent, 0)]


def _near_rejects(hashes: np.ndarray, keys: np.ndarray,
                  dropped: Batch | None) -> tuple[np.ndarray, np.ndarray]:
    """``near_duplicates`` for the rows of some hash values: a row of a dropped value names
    the kept neighbour's first row (``dropped``: value -> up_key); any other row but a value's
    first names that first row."""
    uniq, first, vid = _by_first_occurrence(np.asarray(hashes, dtype=np.int64))
    gone = np.zeros(len(uniq), dtype=bool)
    up_key = np.full(len(uniq), None, dtype=object)
    if dropped is not None and len(dropped[VALUE]):
        order = np.argsort(dropped[VALUE])
        values = dropped[VALUE][order]
        pos = np.minimum(np.searchsorted(values, uniq), len(values) - 1)
        gone = values[pos] == uniq
        up_key[gone] = dropped[UP_KEY][order][pos[gone]]
    own = first[vid] != np.arange(len(hashes))
    return gone[vid] | own, np.where(gone[vid], up_key[vid], keys[first[vid]])


def round_task(step: Round, q: int | None, inputs: list[str],
               dropped: str | None) -> tuple[str | None, str | None, int]:
    """One partition (None: all rows) of one rule: its rejections, scattered by input-file
    group, and its survivors, scattered by the next rule's value. Returns (survivors' file,
    rejections' file, survivors)."""
    rows = to_batch(gather(inputs, q, step.columns()))
    ids = rows[schema.ROW_ID]
    if not len(ids):
        return None, None, 0
    near = to_batch(gather([dropped], q, [VALUE, UP_KEY]), by_row=None) if dropped else None
    reject, dup = _rejects(step, rows, near)
    name = f"{0 if q is None else q:05d}.parquet"
    decided = to_table({schema.ROW_ID: ids[reject],
                        schema.REJECT_REASON: np.full(int(reject.sum()), step.rule.reason, object),
                        schema.DUPLICATE_OF: np.array([str(d or "") for d in dup[reject]],
                                                      dtype=object)})
    decisions = scatter(join(step.out, "decisions", name),
                        [(decided, file_index(ids[reject]) % step.parts)])
    survivors = None
    if step.then is not None:
        live = {c: rows[c][~reject] for c in [schema.ROW_ID, schema.KEY, *step.keep]}
        by = partition_of(live[step.then], step.parts, live[schema.ROW_ID])
        survivors = scatter(join(step.out, "rows", name), [(to_table(live), by)])
    return survivors, decisions, int((~reject).sum())


# --- near duplicates: values -> band pairs -> one resolution ---------------------------------


# --- the plan ---------------------------------------------------------------------------------


def regroup_task(decision_files: list[str], g: int, out: str,
                 name: str) -> tuple[list[int], dict[str, int]]:
    """The rejections of the input files in group ``g`` (file index mod P), written as
    :func:`~vlmray.data.curation.twopass.write_decisions` writes them (``file-<index>``);
    returns (those input files, rejections by reason). Its ``_files.json`` names only this
    group's files: :func:`decide_partitioned` writes the whole list after every group."""
    rows = to_batch(gather(decision_files, g, [schema.ROW_ID, schema.REJECT_REASON,
                                               schema.DUPLICATE_OF]))
    if not len(rows[schema.ROW_ID]):
        return [], {}
    counts = write_decisions(out, name, Decisions(
        row_ids=rows[schema.ROW_ID], reasons=rows[schema.REJECT_REASON],
        duplicate_of=rows[schema.DUPLICATE_OF]))
    return np.unique(file_index(rows[schema.ROW_ID])).tolist(), counts


def _split(stage: Dedup, files: list[tuple[str, int]], plan: list[Rule], parts: int,
           scratch: str, run: Runner) -> tuple[list[str], int]:
    """The compact files' live rows, scattered by the first rule's value; (files, rows)."""
    columns = list(dict.fromkeys([schema.ROW_ID, schema.KEY, *(c for r in plan for c in r.reads)]))
    if files:
        fs, path = filesystem(files[0][0])
        with fs.open(path, "rb") as fh:
            have = pq.ParquetFile(fh).schema_arrow.names
        missing = [c for c in columns if c not in have]
        if missing:
            raise KeyError(f"{stage.name} needs columns {missing}; the compact table has "
                           f"{sorted(have)}")
    by = schema.ROW_ID if plan[0].whole else plan[0].column
    target = max(1, math.ceil(sum(n for _, n in files) / parts))
    done = run(split_task, [(g, columns, by, parts, join(scratch, "split", f"{i:05d}.parquet"))
                             for i, g in enumerate(file_groups(files, target))])
    return [f for f, _ in done if f], sum(n for _, n in done)


def decide_partitioned(stage: Dedup, compact_uri: str, out: str, parts: int, *,
                       run: Runner = run_local,
                       files: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """``stage.decide`` over the compact parquet under ``compact_uri``, in ``parts``
    partitions through ``run``; writes the decisions under ``<out>/<stage.name>`` as
    :func:`~vlmray.data.curation.twopass.write_decisions` would and returns ``{"live_rows",
    "rejected": {reason: rows}, "partitions"}``. Scratch files go under ``<out>/_<name>-partitions`` and
    are removed at the end."""
    plan = rules(stage.cfg)
    scratch = join(out, f"_{stage.name}-partitions")
    remove(scratch)
    files = compact_files(compact_uri) if files is None else files
    current, live = _split(stage, files, plan, parts, scratch, run)
    alive, decided = live, []
    for i, rule in enumerate(plan):
        later = plan[i + 1:]
        step = Round(rule=rule, cfg=stage.cfg, parts=parts, out=join(scratch, f"{i}-{rule.reason}"),
                     then=(schema.ROW_ID if later[0].whole else later[0].column) if later else None,
                     keep=tuple(dict.fromkeys(c for r in later for c in r.reads)))
        dropped = near_pairs(step, current, alive, run) if rule.reason == NEAR_DUPLICATE_IMAGE \
            else None
        done = run(round_task, [(step, q, current, dropped)
                                for q in ([None] if rule.whole else range(parts))])
        current = [s for s, _, _ in done if s]
        decided += [d for _, d, _ in done if d]
        alive = sum(n for _, _, n in done)
    groups = run(regroup_task, [(decided, g, out, stage.name) for g in range(parts)])
    rejected: dict[str, int] = {}
    for _, counts in groups:
        for reason, n in counts.items():
            rejected[reason] = rejected.get(reason, 0) + n
    with open_write(join(out, stage.name, FILES_INDEX)) as fh:
        json.dump(sorted(f for present, _ in groups for f in present), fh)
    remove(scratch)
    return {"live_rows": live, "rejected": dict(sorted(rejected.items())), "partitions": parts}


def decide_uri(stage: Dedup, compact_uri: str, out: str, *,
               remote_args: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:meth:`Dedup.decide_uri`: the partitioned plan as Ray tasks placed by ``remote_args``,
    in ``cfg.partitions`` partitions (0: one per :data:`ROWS_PER_PARTITION` compact rows);
    None when that is 1 (the caller decides over the whole table in one task)."""
    files = compact_files(compact_uri)
    parts = stage.cfg.partitions or math.ceil(sum(n for _, n in files) / ROWS_PER_PARTITION)
    if parts <= 1:
        return None
    return decide_partitioned(stage, compact_uri, out, parts, run=ray_runner(remote_args),
                              files=files)


# --- the global step with a stage that decides from storage ----------------------------------


def live_table(uri: str, columns: Sequence[str], earlier: Sequence[FileDecisions]) -> Batch:
    """``columns`` of the live rows under ``uri`` that no ``earlier`` stage rejected, by
    ``ROW_ID``: streamed batch by batch, so what is held is the result (and the decision
    files of a few input files at a time), never the whole compact table."""
    import pyarrow.dataset as pads

    fs, path = arrow_filesystem(uri)
    data = pads.dataset(path, filesystem=fs, format="parquet")
    live = (pads.field(schema.REJECT_REASON) == "") if schema.REJECT_REASON in \
        data.schema.names else None
    kept = []
    for batch in data.to_batches(columns=list(columns), filter=live):
        ids = batch.column(schema.ROW_ID).to_numpy(zero_copy_only=False)
        drop = np.zeros(len(ids), dtype=bool)
        for stage in earlier:
            reasons = stage.process({schema.ROW_ID: ids}).reasons
            drop |= np.asarray(reasons if reasons is not None else "") != ""
        kept.append(pa.Table.from_batches([batch]).filter(pa.array(~drop)))
    if not kept:
        return {c: np.zeros(0, dtype=np.int64 if c == schema.ROW_ID else object) for c in columns}
    table = pa.concat_tables(kept, promote_options="permissive").sort_by(schema.ROW_ID)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in columns}


def decide_stored(sig_uri: str, stages: Sequence[GlobalStage], out: str,
                  remote_args: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The global step when its first stage decides from storage (``decide_uri``: dedup in
    partitions): that stage runs as many tasks and writes its decisions; each later stage
    then decides in this task over ``ROW_ID`` and its own ``columns`` of the rows no earlier
    stage rejected (keep-top-fraction: 16 B per row), and its decisions are written; the
    summary says how many partitions the first stage ran in (``partitions``). None
    when the first stage has no ``decide_uri`` or declines (a table small enough for one
    task): the caller reads the whole compact table once, as before."""
    lead = getattr(stages[0], "decide_uri", None) if stages else None
    summary = lead(sig_uri, out, remote_args=remote_args) if lead is not None else None
    if summary is None:
        return None
    rejected = {stages[0].name: summary["rejected"]}
    for i, g in enumerate(stages[1:], start=1):
        earlier = [FileDecisions(out, s.name) for s in stages[:i]]
        table = live_table(sig_uri, [schema.ROW_ID, *g.columns], earlier)
        rejected[g.name] = write_decisions(out, g.name, g.decide(table))
    return {"live_rows": summary["live_rows"], "rejected": rejected,
            "partitions": {stages[0].name: summary["partitions"]}}


__all__ = ["ROWS_PER_PARTITION", "Round", "Rule", "decide_partitioned", "decide_stored",
           "decide_uri", "live_table", "rules"]
