"""Several training sources and ZeroVL's single-source (debiased) sampling.

Unit: the per-step source choice (proportional to size, deterministic, the same in every
process), ``Progress`` round trips (per-source positions; old single-stream checkpoints),
``builtin:<seed>`` specs and config errors. Integration, on a real local Ray: a tiny
``zerovl_tiny`` run (two built-in sources, 2 workers) trains on both sources, logs the
source each step drew, and accounts for every row of both in its ingest summary.

    pytest tests/train/test_sources.py -q
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmray
from tests.distributed._spawn import run_gloo
from tests.train.test_pipeline_ray import TINY_MODEL
from vlmray.api import resolve_sources
from vlmray.config import ConfigError, DataConfig, apply_overrides
from vlmray.config.data import SyntheticConfig
from vlmray.config.sources import builtin_config
from vlmray.data.sources import choose_source, source_probabilities
from vlmray.train.checkpoint import (
    MANIFEST,
    PROGRESS,
    STATE,
    Progress,
    SourcePosition,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from vlmray.train.history import read_history
from vlmray.train.loop import Streams
from vlmray.validate import validate

SIZES = [300, 100, 600]


# --- the sampling policy ---------------------------------------------------------------------


def test_choice_frequencies_match_source_sizes() -> None:
    steps = 20_000
    counts = Counter(choose_source(0, s, SIZES) for s in range(steps))
    freq = np.array([counts[k] for k in range(len(SIZES))]) / steps
    # binomial sd <= sqrt(0.25 / 20000) = 0.0035; 5 sd
    np.testing.assert_allclose(freq, source_probabilities(SIZES), atol=0.018)
    np.testing.assert_allclose(source_probabilities(SIZES), [0.3, 0.1, 0.6])


def test_choice_is_deterministic_and_depends_on_seed_and_step() -> None:
    a = [choose_source(3, s, SIZES) for s in range(500)]
    assert a == [choose_source(3, s, SIZES) for s in range(500)]
    assert a != [choose_source(4, s, SIZES) for s in range(500)]
    assert len(set(a)) == 3
    assert {choose_source(0, s, [0, 5]) for s in range(100)} == {1}   # empty source never drawn
    with pytest.raises(ValueError, match="positive sum"):
        choose_source(0, 0, [0, 0])


def _choices_in_process(rank: int, world_size: int, seed: int, steps: int) -> list[int]:
    del rank, world_size
    np.random.seed(1234 + torch.distributed.get_rank())   # global RNG state must not matter
    return [choose_source(seed, s, SIZES) for s in range(steps)]


def test_every_rank_draws_the_same_sources() -> None:
    """Two real processes (a gloo group, as Ray Train's workers) choose identically with no
    communication, and as this process does."""
    ranks = run_gloo(_choices_in_process, 2, 7, 300)
    assert ranks[0] == ranks[1] == [choose_source(7, s, SIZES) for s in range(300)]


# --- progress: per-source positions, old checkpoints -----------------------------------------


def _save(tmp_path: Path, progress: Progress) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched,
                           progress=progress, config={})


def test_progress_round_trip_with_sources(tmp_path: Path) -> None:
    p = Progress(step=9, epoch=1, batch_in_epoch=2, samples_seen=288,
                 sources=[SourcePosition(0, 5), SourcePosition(1, 2)])
    path = _save(tmp_path, p)
    assert load_checkpoint(path, model=torch.nn.Linear(2, 2)) == p
    assert json.loads((path / PROGRESS).read_text())["sources"][1] == {
        "epoch": 1, "batch_in_epoch": 2}
    assert find_latest(tmp_path) == path


def test_old_single_stream_checkpoint_loads(tmp_path: Path) -> None:
    path = _save(tmp_path, Progress(step=6, epoch=2, batch_in_epoch=3, samples_seen=192))
    state = torch.load(path / STATE, weights_only=False)
    state["progress"].pop("sources")                     # as written before sources existed
    torch.save(state, path / STATE)
    (path / MANIFEST).unlink()                           # and before manifests
    p = load_checkpoint(path, model=torch.nn.Linear(2, 2))
    assert p == Progress(step=6, epoch=2, batch_in_epoch=3, samples_seen=192)
    # a single-source run continuing it: source 0 goes on where the stream stood
    assert p.positions(2) == [SourcePosition(2, 3), SourcePosition(0, 0)]
    with pytest.raises(ValueError, match="same sources"):
        p.positions(3)


# --- source specs and config errors ----------------------------------------------------------


def test_builtin_spec_sets_seed_and_fields() -> None:
    base = SyntheticConfig(num_train=100)
    syn = builtin_config("builtin:5?mismatch_frac=0.3&num_train=40", base)
    assert (syn.seed, syn.mismatch_frac, syn.num_train, syn.junk_frac) == (5, 0.3, 40, 0.05)
    assert builtin_config("builtin", base) == base


def test_resolve_sources_generates_each_builtin(tmp_path: Path) -> None:
    cfg = vlmray.recipe("zerovl_tiny", **{
        "data.synthetic.num_train": 20, "data.synthetic.num_eval": 10,
        "data.extra_sources": ["builtin:3?num_train=12&mismatch_frac=0.5"]})
    uris = resolve_sources(cfg, str(tmp_path))
    assert uris == [str(tmp_path / "data" / "train"), str(tmp_path / "data-1" / "train")]
    meta = json.loads((tmp_path / "data-1" / "dataset.json").read_text())
    assert json.dumps(meta).count('"seed": 3') == 1 and '"mismatch_frac": 0.5' in json.dumps(meta)


@pytest.mark.parametrize("overrides, match", [
    ({"data.sampling": "round_robin"}, r"not one of \['mixed', 'single_source'\]"),
    ({"data.extra_sources": []}, "single_source.*data.extra_sources"),
    ({"data.extra_sources": ["builtin:x"]}, "builtin:<seed>"),
    ({"data.extra_sources": ["builtin:1?colour=red"]}, "valid fields: .*mismatch_frac"),
    ({"data.extra_sources": ["builtin"]}, "repeat a source"),
    ({"data.mixup.prob": 2.0}, "data.mixup.prob"),
    ({"data.retrieval.attach": "neighbour_text"}, "data.retrieval .* data.extra_sources"),
])
def test_config_errors_name_the_choices(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(vlmray.recipe("zerovl_tiny"), overrides)


def test_defaults_stay_one_stream() -> None:
    d = DataConfig()
    assert (d.sampling, d.extra_sources, d.mixup.prob) == ("mixed", [], 0.0)
    cfg = validate(vlmray.recipe("zerovl_tiny"))
    assert cfg.data.sampling == "single_source" and len(cfg.data.extra_sources) == 1
    assert cfg.data.mixup.prob > 0 and [s.name for s in cfg.objectives] == ["clip"]


# --- per-source streams: exact resume (real Ray Data iterators) -----------------------------


def _train(streams: Streams, progress: Progress, steps: int) -> list[tuple[int, list[int]]]:
    """What the worker loop does per step: draw, "train", count the batch."""
    out = []
    for _ in range(steps):
        k, batch = streams.next(progress.step)
        streams.trained(k, progress)
        progress.step += 1
        out.append((k, batch["id"].tolist()))
    return out


def test_streams_resume_each_source_at_its_position(ray_local) -> None:
    """A run cut after ``cut`` steps and resumed from its saved Progress draws the same sources
    and ends at the same per-source (epoch, batch) positions as the uncut run; each source's
    position counts exactly the batches drawn from it, across epoch boundaries. (Row order
    within an epoch is Ray Data's to choose, so rows are compared as sets per epoch.)"""
    import ray.data

    cfg = vlmray.recipe("zerovl_tiny", **{"data.shuffle_buffer": 0})
    rows = [20, 12]
    data = [ray.data.from_items([{"id": 100 * k + i} for i in range(n)]).materialize()
            for k, n in enumerate(rows)]
    steps, cut = 20, 9

    def streams(progress: Progress) -> Streams:
        return Streams(cfg, 4, progress, [d.iterator() for d in data], rows)

    whole = _train(streams(p := Progress()), p, steps)      # > 1 epoch of each source
    drawn = [k for k, _ in whole]
    assert drawn == [choose_source(cfg.train.seed, s, rows) for s in range(steps)]
    for k, pos in enumerate(p.sources):
        assert pos.epoch * (rows[k] // 4) + pos.batch_in_epoch == drawn.count(k)
        assert pos.epoch >= 1
    epoch0 = [i for k, ids in whole if k == 0 for i in ids][:20]
    assert sorted(epoch0) == list(range(20))                   # an epoch is each row once
    first = _train(streams(q := Progress()), q, cut)
    saved = Progress.from_dict(json.loads(json.dumps(dataclasses.asdict(q))))   # checkpoint
    rest = _train(streams(saved), saved, steps - cut)
    assert [k for k, _ in first + rest] == drawn
    assert saved == p


def test_datasets_per_sampling_mode(ray_local) -> None:
    """``mixed`` unions every source into the one ``train`` stream; ``single_source`` passes
    each as its own dataset with the sizes the choice draws by."""
    import ray.data

    from vlmray.pipelines.training import _train_datasets

    parts = [ray.data.from_items([{"id": i} for i in range(n)]) for n in (6, 4)]
    cfg = vlmray.recipe("zerovl_tiny", **{"data.mixup.prob": 0.0})
    datasets, sizes = _train_datasets(cfg, parts, [6, 4])
    assert sorted(datasets) == ["train", "train_1"] and sizes == [6, 4]
    mixed = apply_overrides(cfg, {"data.sampling": "mixed"})
    datasets, sizes = _train_datasets(mixed, parts, [6, 4])
    assert list(datasets) == ["train"] and sizes is None
    assert datasets["train"].count() == 10


# --- integration: a real local Ray ----------------------------------------------------------

STEPS = 6
TINY = {
    "train.steps": STEPS, "train.batch_size": 32, "train.num_workers": 2,
    "train.cpus_per_worker": 0.5, "train.log_every": 1, "train.checkpoint_every": 0,
    "eval.every": 0, "eval.max_samples": 40, "data.synthetic.num_train": 320,
    "data.synthetic.num_eval": 40, "data.synthetic.shard_size": 160,
    "data.synthetic.corrupt_frac": 0.02,
    "data.extra_sources": ["builtin:1?num_train=160&mismatch_frac=0.25&corrupt_frac=0.05"],
    **TINY_MODEL,
}


@pytest.fixture(scope="module")
def zerovl_run(ray_local, tmp_path_factory) -> vlmray.RunResult:
    cfg = vlmray.recipe("zerovl_tiny", **TINY)
    return vlmray.run(cfg, output=str(tmp_path_factory.mktemp("zerovl") / "out"))


def test_run_draws_from_both_sources_as_chosen(zerovl_run: vlmray.RunResult) -> None:
    m = zerovl_run.metrics
    sizes = m["source_sizes"]
    assert sizes == [320, 160]              # the streamed counting pass: raw rows per source
    want = [choose_source(0, s, sizes) for s in range(STEPS)]
    assert set(want) == {0, 1}, f"seed 0 should draw both sources in {STEPS} steps: {want}"
    rows = read_history(zerovl_run.run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["source_index"] for r in rows] == want
    assert m["steps"] == STEPS and m["samples_seen"] == STEPS * 32
    # the final checkpoint records each source's position: batches trained on per source
    progress = json.loads((Path(zerovl_run.checkpoint) / PROGRESS).read_text())
    for k, pos in enumerate(progress["sources"]):
        if pos["epoch"] == 0:
            assert pos["batch_in_epoch"] == want.count(k)


def test_ingest_summary_accounts_for_both_sources(zerovl_run: vlmray.RunResult) -> None:
    m = zerovl_run.metrics
    first, second = m["sources"]
    assert first["rows_in"] == 320 and second["rows_in"] == 160
    assert second["source"].startswith("builtin:1?")
    for s in (first, second):
        assert s["rows_in"] == s["rows_accepted"] + s["rows_rejected"]
        assert sum(s["reject_reasons"].values()) == s["rows_rejected"]
    assert first["reject_reasons"]["decode_error"] == round(0.02 * 320)
    assert second["reject_reasons"]["decode_error"] == round(0.05 * 160)
    assert m["rows_in"] == 480
    assert m["rows_accepted"] == first["rows_accepted"] + second["rows_accepted"]
    assert m["reject_reasons"]["decode_error"] == round(0.02 * 320) + round(0.05 * 160)
    run = Path(zerovl_run.run_dir)
    assert (run / "rejects").is_dir() and (run / "rejects-1").is_dir()
