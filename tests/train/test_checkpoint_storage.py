"""``find_latest`` on an object store (moto's S3 server) and reading the checkpoint it names
back through a Ray ``Checkpoint``, the way a ``--resume`` of an ``s3://`` run does.

    pytest tests/train/test_checkpoint_storage.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.test_optim_checkpoint import tiny_model
from vlmray.config import TrainConfig
from vlmray.data.storage import filesystem
from vlmray.train.checkpoint import (
    Progress,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from vlmray.train.restore import checkpoint_at as _checkpoint_at
from vlmray.train.restore import checkpoint_step as _checkpoint_step
from vlmray.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _upload(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    for f in local.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")


def test_find_latest_on_s3_returns_the_highest_complete_checkpoint_uri(
        s3_bucket: str, tmp_path: Path) -> None:
    root = f"{s3_bucket}/run/ray"
    assert find_latest(root) is None
    model = tiny_model(0)
    opt, sched = build_optimizer(model, TrainConfig())
    for name, step in [("train/checkpoint_a", 5), ("train/checkpoint_b", 20), ("c", 3)]:
        save_checkpoint(tmp_path / name, model=model, optimizer=opt, scheduler=sched,
                        progress=Progress(step=step, samples_seen=step * 4), config={})
    (tmp_path / "train/partial").mkdir()                      # progress.json, no state.pt
    (tmp_path / "train/partial/progress.json").write_text(json.dumps({"step": 99}))
    _upload(tmp_path, root)

    latest = find_latest(root)
    assert latest == f"{root}/train/checkpoint_b" and isinstance(latest, str)
    assert find_latest(f"{root}/c") == f"{root}/c"             # a checkpoint dir itself
    assert find_latest(f"{s3_bucket}/elsewhere") is None

    ckpt = _checkpoint_at(latest)                              # what the workers restore from
    assert _checkpoint_step(ckpt) == 20
    other = tiny_model(1)
    with ckpt.as_directory() as d:
        assert load_checkpoint(d, model=other) == Progress(step=20, samples_seen=80)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_find_latest_local_paths_stay_paths(tmp_path: Path) -> None:
    model = tiny_model(0)
    opt, sched = build_optimizer(model, TrainConfig())
    save_checkpoint(tmp_path / "ray/ck", model=model, optimizer=opt, scheduler=sched,
                    progress=Progress(step=7), config={})
    assert find_latest(str(tmp_path / "ray")) == tmp_path / "ray/ck"
    assert _checkpoint_step(_checkpoint_at(str(tmp_path / "ray/ck"))) == 7
