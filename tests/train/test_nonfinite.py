"""A diverging run stops with a clear error after ``train.max_bad_steps`` skipped updates in a
row, counts them in ``skipped_steps``, and never checkpoints non-finite weights (in-process:
the per-worker loop over a repeated batch, ``ray.train.report`` replaced, no Ray cluster).

    pytest tests/train/test_nonfinite.py -q
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.train.test_recipe_smoke import BATCH, make_batch, small_config
from vlmray.distributed import Dist
from vlmray.train import loop
from vlmray.train.checkpoint import STATE
from vlmray.train.history import History, read_history
from vlmray.train.state import build_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RepeatShard:
    """A worker's dataset shard that serves one batch ``per_epoch`` times an epoch."""

    def __init__(self, batch: dict[str, torch.Tensor], per_epoch: int = 4) -> None:
        self.batch, self.per_epoch = batch, per_epoch

    def iter_torch_batches(self, **_: object) -> Iterator[dict[str, torch.Tensor]]:
        return iter([self.batch] * self.per_epoch)


def test_diverging_run_stops_after_max_bad_steps_without_a_nan_checkpoint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = small_config("clip_tiny")
    cfg.train.log_every, cfg.train.checkpoint_every, cfg.eval.every = 1, 1, 0
    cfg.train.steps, cfg.train.max_bad_steps = 40, 3
    cfg.train.lr = 1e30   # the range check refuses it when the config is built; set it after
    state = build_state(cfg, device=torch.device("cpu"))
    dist = Dist.current()
    streams = loop.Streams(cfg, BATCH, state.progress, [RepeatShard(make_batch(cfg))])
    history = History(str(tmp_path), enabled=True)
    reported: list[dict] = []
    saved: list[dict[str, torch.Tensor]] = []

    def report(metrics: dict, checkpoint: object = None) -> None:
        reported.append(metrics)
        if checkpoint is not None:   # read before the loop deletes its temporary directory
            saved.append(torch.load(Path(checkpoint.path) / STATE, weights_only=False)["model"])

    monkeypatch.setattr(loop.ray.train, "report", report)
    config = {"cfg": cfg.to_dict(), "run_dir": str(tmp_path)}
    with pytest.raises(loop.NonFiniteError, match=r"3 steps in a row .*train\.max_bad_steps=3"):
        loop.run_steps(state, streams, config, None, history, dist)

    last = state.progress.step
    assert 4 <= last < cfg.train.steps                 # stopped early: step 1 blew the weights up
    assert len(saved) == last - 1                      # every step but the aborting one
    assert all(bool(torch.isfinite(t).all()) for w in saved for t in w.values()
               if t.is_floating_point())               # no checkpoint with NaN weights
    now = state.core.state_dict()                      # the skipped updates left them alone
    assert all(torch.equal(t, now[k]) for w in saved[-2:] for k, t in w.items())
    rows = read_history(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, last + 1))
    assert rows[-1]["skipped_steps"] == 3 and "loss" not in rows[-1]   # its NaN is left out
    assert all(math.isfinite(r["loss"]) for r in rows if r["skipped_steps"] == 0)
    assert reported[-1]["step"] == last - 1            # the aborting step is logged, not reported



def test_non_finite_weights_are_never_checkpointed(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    cfg = small_config("clip_tiny")
    state = build_state(cfg, device=torch.device("cpu"))
    reported: list[object] = []
    monkeypatch.setattr(loop.ray.train, "report", lambda m, **kw: reported.append(kw))
    with torch.no_grad():
        state.core.vision.trunk.cls_token.fill_(float("nan"))
    with pytest.raises(loop.NonFiniteError, match="weights are not finite; no checkpoint"):
        loop._checkpoint_and_report(state, {"step": 0}, cfg.to_dict(), Dist.current())
    assert reported == []

