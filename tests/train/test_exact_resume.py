"""Exact, elastic resume on a real local Ray (issue 17): every worker logs the row ids of every
step (``VLMRAY_ROW_LOG``), and

1. a run whose rank 0 dies after step 6 (``VLMRAY_FAULT_AT_STEP``) and is restored by Ray Train
   from the step-4 checkpoint — whose cursor points into the middle of a unit, i.e. into a tar's
   member list — trains on the same rows at every step, with the same losses and the same final
   weights, bit for bit, as the same run uninterrupted; with curation and the caption rewrite as
   a streaming prefix, and across an epoch boundary; every input row is counted once and every
   rejected row written once;
2. a run checkpointed with 2 workers and resumed (``--resume``) with 3 continues the same epoch:
   no row of it is trained twice, and all of its accepted rows are trained but its tail.

    python -m pytest tests/train/test_exact_resume.py -q -s      # ~3 min on 2 cores
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import vlmray
from tests.train.test_pipeline_ray import TINY_MODEL
from vlmray.train.history import read_events, read_history
from vlmray.train.lanes import ROW_LOG_ENV
from vlmray.train.loop import FAULT_AT_STEP_ENV

ROWS = 400
RUN = {
    "train.num_workers": 2, "train.batch_size": 32, "train.steps": 16, "train.log_every": 2,
    "train.checkpoint_every": 4, "train.max_failures": 1, "eval.every": 0,
    "eval.max_samples": 30, "data.synthetic.num_train": ROWS, "data.synthetic.num_eval": 30,
    "data.synthetic.shard_size": 200, "data.unit_rows": 48, "data.curate": True,
    "data.rewrite.backend": "offline", "data.rewrite.k": 1, **TINY_MODEL,
}
"""Two 200-row tars in 48-row units; 16 steps of 2 x 16 rows cross the end of epoch 0."""


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Driver environment variables that build_trainer passes on to the workers."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rows_by_step(run_dir: str) -> tuple[dict[tuple[int, int], list[int]], list[dict]]:
    """(rank, step) -> row ids of its last logged attempt; and every record as logged."""
    records = [json.loads(line) for f in sorted(Path(run_dir, "rowlog").glob("rank-*.jsonl"))
               for line in f.read_text().splitlines()]
    return {(r["rank"], r["step"]): r["rows"] for r in records}, records


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    state = torch.load(Path(checkpoint, "state.pt"), weights_only=True)
    return state["model"]


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory) -> dict[str, vlmray.RunResult]:
    root = tmp_path_factory.mktemp("exact")
    cfg = vlmray.recipe("clip_tiny", **RUN)
    with _env(**{ROW_LOG_ENV: "1"}):
        plain = vlmray.run(cfg, output=str(root / "plain"))
        with _env(**{FAULT_AT_STEP_ENV: "6"}):
            faulted = vlmray.run(cfg, output=str(root / "faulted"))
    return {"plain": plain, "faulted": faulted}


def test_a_restored_run_is_the_uninterrupted_run_bit_for_bit(runs) -> None:
    plain, faulted = runs["plain"], runs["faulted"]
    events = read_events(faulted.run_dir)
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("fault", 6), ("start", 4)]
    assert events[2]["data"] == "resumed" and events[2]["rng"] == "restored"
    rows_plain, _ = _rows_by_step(plain.run_dir)
    rows_faulted, records = _rows_by_step(faulted.run_dir)
    assert sorted(rows_plain) == [(r, s) for r in range(2) for s in range(16)]
    assert rows_faulted == rows_plain                   # the same rows at every step
    # steps 4 and 5 were read twice (before the fault, and again after the restore): the same
    seen: dict[tuple[int, int], list[int]] = {}
    for rec in records:
        key = (rec["rank"], rec["step"])
        assert seen.setdefault(key, rec["rows"]) == rec["rows"], key
    assert Counter(r["step"] for r in records)[4] == 4      # 2 ranks x 2 attempts
    losses = [{r["step"]: r["loss"] for r in read_history(run.run_dir)} for run in (plain, faulted)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    a, b = _weights(plain.checkpoint), _weights(faulted.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the epoch ended (one lane ran out) and both runs went on into epoch 1 at the same step
    epochs = [{(r["rank"], r["step"]): r["epoch"] for r in _rows_by_step_all(run.run_dir)}
              for run in (plain, faulted)]
    assert epochs[0] == epochs[1] and set(epochs[0].values()) == {0, 1}


def _rows_by_step_all(run_dir: str) -> list[dict]:
    return _rows_by_step(run_dir)[1]


@pytest.mark.parametrize("which", ["plain", "faulted"])
def test_every_input_row_is_counted_once_across_the_restart(runs, which: str) -> None:
    run = runs[which]
    m = run.metrics
    assert m["rows_in"] == ROWS                   # more than one epoch was read: every row
    assert m["rows_accepted"] + m["rows_rejected"] == ROWS
    assert m["rows_rejected"] > 0 and "rewrite_fallbacks" in m
    rejects = pq.read_table(Path(run.run_dir) / "rejects")
    assert rejects.num_rows == m["rows_rejected"]     # each rejected row written once
    assert len(set(rejects.column("key").to_pylist())) == rejects.num_rows
    trained = {row for rows in _rows_by_step(run.run_dir)[0].values() for row in rows}
    assert len(trained) <= m["rows_accepted"]


def test_a_run_resumed_with_more_workers_continues_the_epoch(ray_local, tmp_path: Path) -> None:
    unit, batch = 16, 30
    over = {**RUN, "data.curate": False, "data.rewrite.k": 0,
            "data.unit_rows": unit, "train.batch_size": batch, "train.max_failures": 0,
            "train.checkpoint_every": 6}
    out = str(tmp_path / "run")
    with _env(**{ROW_LOG_ENV: "1"}):
        vlmray.run(vlmray.recipe("clip_tiny", **{**over, "train.steps": 6}), output=out)
        result = vlmray.run(vlmray.recipe("clip_tiny", **{**over, "train.steps": 14,
                                                          "train.num_workers": 3}),
                            output=out, resume=True)
    events = read_events(out)
    assert [e["data"] for e in events if e["event"] == "start"] == ["fresh", "redealt 2->3"]
    records = _rows_by_step(out)[1]
    assert {r["rank"] for r in records if r["step"] >= 6} == {0, 1, 2}
    epoch0 = [row for r in records if r["epoch"] == 0 for row in r["rows"]]
    counts = Counter(epoch0)
    assert max(counts.values()) == 1                       # no row of the epoch twice
    assert {r["epoch"] for r in records} == {0, 1}         # the epoch ran to its end
    accepted = result.metrics["rows_accepted"]
    tail = accepted - len(counts)
    # what one epoch leaves untrained: at most about one unit and one batch per lane
    assert 0 <= tail <= 3 * (unit + batch // 3)
