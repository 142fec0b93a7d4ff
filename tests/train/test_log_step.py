"""The training loop keeps a step's metrics on the device and reads them in one host sync, on
logging steps only (in-process: ``ray.train.report`` is replaced, no Ray cluster).

    pytest tests/train/test_log_step.py -q
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.objectives.test_metrics_host import counting_reads
from tests.train.test_recipe_smoke import make_batch, small_config
from vlmray.distributed import Dist
from vlmray.train import loop
from vlmray.train.history import History, read_history
from vlmray.train.state import build_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metrics_reach_the_host_once_and_only_on_logging_steps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = small_config("clip_tiny")
    cfg.train.log_every, cfg.train.checkpoint_every, cfg.eval.every = 2, 0, 0
    state = build_state(cfg, device=torch.device("cpu"))
    batch, dist = make_batch(cfg), Dist.current()
    history = History(str(tmp_path), enabled=True)
    config = {"cfg": {}, "run_dir": str(tmp_path)}     # cfg: only read to checkpoint
    window = {"t_last": time.perf_counter(), "wait": 0.0, "steps": 0}
    reported: list[dict] = []
    for step in range(1, 5):
        metrics = loop.train_step(state, batch, dist, host=False)
        assert all(isinstance(metrics[k], torch.Tensor) for k in ("loss", "loss/clip",
                                                                  "clip/acc_i2t", "grad_norm"))
        state.progress.step = step
        window["steps"] += 1
        with counting_reads(monkeypatch) as calls:
            monkeypatch.setattr(loop.ray.train, "report", lambda m, **_: reported.append(m))
            loop._log_step(state, metrics, window, config, None, history, dist, done=False)
        assert calls == (Counter(tolist=1) if step % 2 == 0 else Counter()), step
        assert len(reported) == step // 2
    for row in reported:
        assert {"loss", "loss/clip", "clip/acc_i2t", "clip/acc_t2i", "clip/logit_scale", "lr",
                "logit_scale", "grad_norm", "temperature", "step", "samples_per_s"} <= set(row)
        assert all(type(v) in (int, float) for v in row.values()), row
        assert row["temperature"] == 1.0 / row["logit_scale"] and math.isfinite(row["loss"])
    logged = read_history(str(tmp_path))
    assert [r["step"] for r in logged] == [2, 4]
    assert logged[-1]["loss/clip"] == reported[-1]["loss/clip"]    # tensors would be dropped
