"""Retrieval for a training run: build (or reuse) the index, then the Ray Data stages that give
every training row its neighbours.

    plan = prepare(cfg, train_uri, eval_uri, run_dir)        # driver, before ingest
    ingest = run_ingest(cfg.data, train_uri, retrieval=plan.stages)
    trainer = build_trainer(plan.config, ..., eval_refs=plan.eval_refs)

The stages are: split (RA-CLIP's reference rows leave training as ``outside_subset``)
-> embed each row with the frozen embedder -> top-k search, skipping the row itself and its
near-duplicates -> attach what the recipe needs (reference embeddings, or the neighbour's
caption). The embedder is named in ``data.retrieval.embedder``; ``bootstrap`` first trains a
short CLIP on the reference split (rows the main run never trains on).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vlmray.config import ConfigError, ObjectiveSpec
from vlmray.config.jobs import IndexJobConfig
from vlmray.config.retrieval import BOOTSTRAP, EmbedConfig, RetrievalConfig
from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput, num_rows
from vlmray.data.shards import iter_shards
from vlmray.data.storage import arrow_filesystem, filesystem, join
from vlmray.retrieval.attach import (
    AttachConfig,
    AttachNeighbours,
    EmbeddingTable,
    load_embedding_table,
)
from vlmray.retrieval.embed import EmbedStage
from vlmray.retrieval.search import SearchConfig, SearchStage, ShipsLight
from vlmray.retrieval.split import SubsetStage
from vlmray.train.checkpoint import find_latest

if TYPE_CHECKING:
    from vlmray.config import Config

NOT_INDEXED = "not_indexed"
"""Reject reason: the row has no vector in the index's embedding table (it was rejected when
the index was built, e.g. an image that does not decode)."""


class LookupQueries(ShipsLight):
    """Writes each row's query vector (``column``) from an embedding table, by key; a row
    missing from the table is rejected as ``not_indexed``. The table loads once per actor."""

    name: ClassVar[str] = "lookup_queries"
    reasons: ClassVar[tuple[str, ...]] = (NOT_INDEXED,)
    _heavy: ClassVar[str] = "_table"

    def __init__(self, table: str, column: str) -> None:
        self.table, self.column = table, column
        self.resources = Resources(num_cpus=0.25, actors=1, batch_size=256)
        self._table: EmbeddingTable | None = None

    def setup(self) -> None:
        self._table = load_embedding_table(self.table)
        if self.column not in self._table.embeds:
            raise ValueError(f"{self.table} holds no {self.column} column")

    def process(self, batch: Batch) -> StageOutput:
        assert self._table is not None
        rows = np.array([self._table.rows.get(str(k), -1) for k in batch[schema.KEY]],
                        dtype=np.int64)
        found = rows >= 0
        vectors = self._table.embeds[self.column][np.maximum(rows, 0)] * found[:, None]
        return StageOutput(columns={self.column: vectors.astype(np.float32)},
                           reasons=np.where(found, "", NOT_INDEXED).astype(object))

    def __call__(self, batch: Batch) -> Batch:
        batch = super().__call__(batch)
        if self.column not in batch:          # no live row in this batch: zeros, same shape
            assert self._table is not None
            dim = self._table.embeds[self.column].shape[1]
            batch[self.column] = np.zeros((num_rows(batch), dim), dtype=np.float32)
        return batch


@dataclass
class RetrievalPlan:
    """What :func:`prepare` built: the run's config (``model.ra_ref_dim`` filled in), the
    ingest stages, and where the index and the held-out references are."""

    config: Config
    stages: list[Stage] = field(default_factory=list)
    index_dir: str = ""
    embedder: str = ""
    eval_refs: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def split_stage(r: RetrievalConfig) -> SubsetStage | None:
    """The reference split for a run (None without one): the main run keeps the rows outside
    the reference set, the bootstrap run only those inside it."""
    if r.reference_fraction <= 0:
        return None
    side = "train" if r.train_on == "rest" else "reference"
    return SubsetStage(side, r.reference_fraction, r.split_seed)


def prepare(cfg: Config, train_uri: str, eval_uri: str, run_dir: str, *,
            bootstrapped: str = "") -> RetrievalPlan:
    """Resolves the embedder, builds or reuses the index, and returns the stages ingest runs.
    Needs Ray initialised. ``bootstrapped`` is the finished bootstrap run when
    ``data.retrieval.needs_bootstrap`` (the caller trains it: :func:`bootstrap_plan`). A split
    without retrieval (the bootstrap run itself) gets just the split stage."""
    r = cfg.data.retrieval
    plan = RetrievalPlan(config=cfg)
    if (split := split_stage(r)) is not None:
        plan.stages.append(split)
    if not r.enabled:
        return plan
    if r.index_dir:
        plan.index_dir, plan.embedder = r.index_dir, _reused_embedder(r)
    else:
        plan.embedder = r.resolved_embedder
        if plan.embedder == BOOTSTRAP:
            if not bootstrapped:
                raise ValueError("data.retrieval needs the bootstrap run: train it first "
                                 "(bootstrap_plan) and pass its directory as bootstrapped=")
            plan.embedder = bootstrapped
        plan.index_dir = join(run_dir, "retrieval")
        plan.stats = _build(cfg, train_uri, plan.embedder, plan.index_dir)
    plan.stages += _neighbour_stages(r, plan.embedder, plan.index_dir)
    if r.attach == "references":
        dim = _index_dim(plan.index_dir, r.modality)
        plan.config = _with_ref_dim(cfg, dim)
        if eval_uri:
            plan.eval_refs = join(plan.index_dir, "eval_refs.parquet")
            coverage = write_eval_refs(eval_uri, plan.stages[-3:], plan.eval_refs,
                                       max_samples=cfg.eval.max_samples)
            plan.stats = {**plan.stats, "eval_references_per_row": coverage}
            if coverage < 0.5 * r.k:
                print(f"[vlmray] warning: held-out images found {coverage:.2f} of "
                      f"data.retrieval.k={r.k} references on average; neighbours at cosine >= "
                      f"data.retrieval.duplicate_threshold={r.duplicate_threshold} count as "
                      f"duplicates and are skipped (raise it for a coarse embedder)", flush=True)
    return plan


def _reused_embedder(r: RetrievalConfig) -> str:
    """The embedder of the ``jobs/build_index.py`` output named in ``data.retrieval.index_dir``
    (queries must be embedded by the same model), after checking it fits this run."""
    import json

    fs, path = filesystem(join(r.index_dir, "stats.json"))
    if not fs.exists(path):
        raise ConfigError(f"data.retrieval.index_dir {r.index_dir!r} holds no finished "
                          f"jobs/build_index.py output (stats.json)")
    job = json.loads(fs.cat_file(path))["config"]
    built_with = job["embed"]["model"]
    if r.embedder and r.embedder != built_with:
        raise ConfigError(f"data.retrieval.embedder={r.embedder!r} but the index at "
                          f"{r.index_dir!r} was built with {built_with!r}")
    if r.reference_fraction > 0 and (job["subset"], job["reference_fraction"],
                                     job["split_seed"]) != ("reference", r.reference_fraction,
                                                            r.split_seed):
        raise ConfigError(f"the index at {r.index_dir!r} is not this run's reference set "
                          f"(subset={job['subset']!r}, reference_fraction="
                          f"{job['reference_fraction']}, split_seed={job['split_seed']}); "
                          f"build it with --subset reference and the same fraction and seed")
    return built_with


def _neighbour_stages(r: RetrievalConfig, embedder: str, index_dir: str) -> list[Stage]:
    query = schema.IMAGE_EMBED if r.modality == "image" else schema.TEXT_EMBED
    table = join(index_dir, "embeddings")
    if r.reference_fraction == 0 and not r.index_dir:
        # This run's index holds every training row, embedded by this embedder: look the
        # query vectors up by key instead of embedding the rows a second time.
        queries: Stage = LookupQueries(table, query)
    else:
        queries = EmbedStage(EmbedConfig(model=embedder, modality=r.modality, num_cpus=0.5))
    # Fractional CPUs: the three actor pools together hold one core, so read and decode tasks
    # keep the other even on a 2-core machine (whole-core actors would starve them).
    return [
        queries,
        SearchStage(SearchConfig(index=join(index_dir, "index", r.modality), query_column=query,
                                 k=r.k, duplicate_threshold=r.duplicate_threshold,
                                 num_cpus=0.25)),
        AttachNeighbours(AttachConfig(table=table, k=r.k,
                                      references=r.attach == "references",
                                      neighbour_text=r.attach == "neighbour_text",
                                      num_cpus=0.25)),
    ]


def _build(cfg: Config, train_uri: str, embedder: str, out: str) -> dict[str, Any]:
    """Embeds the rows to index (the reference split, or all training rows) and builds the
    index into ``out``; an ``out`` holding a finished build (``stats.json``) is reused."""
    import json

    from vlmray.data.outputs import claim_output
    from vlmray.pipelines.index import JOB
    from vlmray.pipelines.index import run as run_index_job

    fs, path = filesystem(join(out, "stats.json"))
    if fs.exists(path):
        return json.loads(fs.cat_file(path))
    claim_output(out, JOB)        # <run>/retrieval is the index job's, beside bootstrap/'s run
    r = cfg.data.retrieval

    modality = "both" if r.attach == "references" else "text"
    job = IndexJobConfig(input=train_uri, output=out, embed=EmbedConfig(model=embedder,
                         modality=modality), index=r.index,
                         subset="reference" if r.reference_fraction > 0 else "all",
                         reference_fraction=r.reference_fraction, split_seed=r.split_seed)
    return run_index_job(job)


def _index_dim(index_dir: str, modality: str) -> int:
    import json

    fs, path = filesystem(join(index_dir, "index", modality, "report.json"))
    return int(json.loads(fs.cat_file(path))["report"]["dim"])


def _with_ref_dim(cfg: Config, dim: int) -> Config:
    model = cfg.model
    if model.ra_ref_dim and model.ra_ref_dim != dim:
        raise ConfigError(f"model.ra_ref_dim={model.ra_ref_dim} but the index holds {dim}-d "
                          f"vectors; set it to {dim} or 0 (taken from the index)")
    out = copy.deepcopy(cfg)
    out.model.ra_ref_dim = dim
    return out


def bootstrap_plan(cfg: Config, run_dir: str) -> tuple[str, Config | None, bool]:
    """(run dir, config, resume) of the bootstrap run: plain CLIP for ``bootstrap_steps`` on
    the reference split (the same model and data settings, no retrieval) into
    ``<run>/retrieval/bootstrap``, whose checkpoint then embeds the index. The config is None
    when a finished bootstrap run is there to reuse; resume is True when one was started."""
    import json

    out = join(run_dir, "retrieval", "bootstrap")
    fs, metrics = filesystem(join(out, "metrics.json"))
    finished = fs.exists(metrics) and not json.loads(fs.cat_file(metrics)).get("failed")
    if finished and find_latest(join(out, "ray")):      # a failed run writes metrics.json too
        return out, None, False
    started = fs.exists(filesystem(join(out, "config.json"))[1])
    r = cfg.data.retrieval
    boot = copy.deepcopy(cfg)
    boot.recipe = f"{cfg.recipe or 'run'}:bootstrap"
    boot.objectives = [ObjectiveSpec(name="clip")]
    boot.model.ra_layers, boot.model.ra_ref_dim = 0, 0
    boot.data.retrieval = RetrievalConfig(reference_fraction=r.reference_fraction,
                                          split_seed=r.split_seed, train_on="reference")
    if cfg.data.source == "builtin":
        boot.data.source = join(run_dir, "data")
    boot.train.steps = r.bootstrap_steps
    boot.train.checkpoint_every, boot.eval.every = 0, 0
    boot.train.warmup_steps = min(boot.train.warmup_steps, max(1, r.bootstrap_steps // 10))
    return out, boot, started


def write_eval_refs(eval_uri: str, stages: list[Stage], out: str, *, max_samples: int) -> float:
    """Runs the embed -> search -> attach stages in-process over the held-out rows that
    evaluation reads, writing KEY and the reference columns to the parquet file ``out``.
    Returns the mean number of references found per row."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq


    rows = list(itertools.islice(iter_shards(eval_uri), max_samples))
    batch = {c: np.asarray([row.get(c) for row in rows], dtype=object)
             for c in (schema.KEY, schema.IMAGE, schema.TEXT)}
    for stage in stages:
        batch = stage(batch)
    columns = {schema.KEY: pa.array([str(k) for k in batch[schema.KEY]], pa.string())}
    for name in (schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK):
        columns[name] = pa.array([np.asarray(v, np.float32).tolist() for v in batch[name]])
    fs, path = arrow_filesystem(out)
    pq.write_table(pa.table(columns), path, filesystem=fs)
    return float(np.asarray(batch[schema.REF_MASK], np.float32).sum(axis=1).mean())


__all__ = ["NOT_INDEXED", "LookupQueries", "RetrievalPlan", "bootstrap_plan", "prepare",
           "split_stage", "write_eval_refs"]
