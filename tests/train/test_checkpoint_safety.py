"""Checkpoints never execute code: every reader of a vlmray checkpoint (the resume path, the
evaluate job, resolve_model(...).load()) refuses a ``state.pt`` whose pickle would call
something, and the call never happens; saving converts what would not load so, or refuses it.

The payload is a pickle whose ``__reduce__`` runs ``touch <marker>`` through ``os.system``:
loaded unsafely it creates the marker (checked first, so the other tests prove something).

    pytest tests/train/test_checkpoint_safety.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from torch import nn

from jobs.evaluate import main as evaluate_main
from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config import Config
from vlmray.data.storage import filesystem
from vlmray.embedders import resolve_model
from vlmray.train.checkpoint import (
    MANIFEST,
    STATE,
    Progress,
    UnsafeCheckpointError,
    load_checkpoint,
    plain_state,
    save_checkpoint,
)
from vlmray.train.restore import restore as _restore
from vlmray.train.state import build_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEP = 5


class Touch:
    """Unpickled, runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def reseal(ckpt: Path) -> None:
    """Rewrites the manifest to match the files as they are now (what an attacker who can
    write the directory can do too)."""
    files = {name: {"size": (ckpt / name).stat().st_size,
                    "sha256": hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}
             for name in ("state.pt", "config.json", "progress.json")}
    (ckpt / MANIFEST).write_text(json.dumps({"version": 1, "step": STEP, "files": files}))


def plant(run: Path, marker: Path, how: str = "zip") -> Path:
    """A real checkpoint of the tiny default model at ``run/ray/checkpoint_<STEP>`` whose
    state.pt is replaced by a malicious one: ``zip`` (torch.save, the payload next to real
    weights; resealed), ``legacy`` (the same, and no manifest: an old-format checkpoint) or
    ``raw`` (a bare pickle, resealed)."""
    _, model = save_tiny_checkpoint(run, step=STEP)
    ckpt = run / "ray" / f"checkpoint_{STEP:06d}"
    if how == "raw":
        (ckpt / STATE).write_bytes(pickle.dumps({"model": Touch(marker)}))
    else:
        torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {},
                    "progress": {"step": STEP, "payload": Touch(marker)}}, ckpt / STATE)
    if how == "legacy":
        (ckpt / MANIFEST).unlink()
    else:
        reseal(ckpt)
    return ckpt


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "pwned"
    yield m
    assert not m.exists(), "the checkpoint's payload ran"


def test_the_payload_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    ckpt = plant(tmp_path / "run", tmp_path / "control")
    torch.load(ckpt / STATE, weights_only=False)
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_load_checkpoint_refuses_it(tmp_path: Path, marker: Path, how: str) -> None:
    ckpt = plant(tmp_path / "run", marker, how)
    with pytest.raises(UnsafeCheckpointError, match="refused to load state.pt"):
        load_checkpoint(ckpt, model=nn.Linear(2, 2))


def test_the_resume_path_refuses_it(tmp_path: Path, marker: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``_restore`` as a Ray Train worker runs it: the run's storage (and ``--resume``'s
    checkpoint) hold the planted checkpoint; Ray's own record is empty."""
    run = tmp_path / "run"
    ckpt = plant(run, marker)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    state = build_state(Config(), device=torch.device("cpu"))
    with pytest.raises(UnsafeCheckpointError, match="tensors and plain types"):
        _restore(state, str(ckpt), str(run))
    assert state.progress.step == 0


def test_the_evaluate_job_refuses_it(tmp_path: Path, marker: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    plant(run, marker)
    assert evaluate_main([str(run)]) == 1
    assert "refused to load state.pt" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resolve_model_load_refuses_it(tmp_path: Path, marker: Path, where: str,
                                       request: pytest.FixtureRequest) -> None:
    run = tmp_path / "run"
    plant(run, marker)
    spec = str(run)
    if where == "s3":                       # downloaded from the bucket by the worker's load
        spec = f"{request.getfixturevalue('s3_bucket')}/runs/a"
        fs, root = filesystem(spec)
        fs.put(str(run), root, recursive=True)
    source = resolve_model(spec)           # resolving reads only config.json
    with pytest.raises(UnsafeCheckpointError):
        source.load("cpu")


def test_an_old_plain_checkpoint_loads_and_a_non_plain_one_says_why(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    old = {"model": model.state_dict(), "optimizer": {}, "scheduler": {},
           "progress": {"step": 3, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 12}}
    ckpt = _old_checkpoint(tmp_path / "plain", old)
    other = nn.Linear(2, 2)
    assert load_checkpoint(ckpt, model=other).step == 3
    assert torch.equal(other.weight, model.weight)

    old["progress"]["queue"] = np.zeros(3)          # numpy: not a tensor or plain type
    ckpt = _old_checkpoint(tmp_path / "numpy", old)
    with pytest.raises(UnsafeCheckpointError, match="old checkpoint you wrote yourself"):
        load_checkpoint(ckpt, model=other)


def _old_checkpoint(path: Path, state: dict) -> Path:
    """A checkpoint as vlmray wrote it before manifests (and before weights_only)."""
    path.mkdir(parents=True)
    torch.save(state, path / STATE)
    (path / "config.json").write_text("{}")
    (path / "progress.json").write_text(json.dumps(state["progress"], default=str))
    return path


# --- saving: only tensors and plain types reach state.pt ------------------------------------


@dataclass
class Stats:
    count: int
    mean: float


class Stateful(nn.Module):
    """An objective whose extra state holds numpy values and a dataclass."""

    def __init__(self, extra: object) -> None:
        super().__init__()
        self.register_buffer("queue", torch.arange(4.0))
        self.extra, self.loaded = extra, None

    def get_extra_state(self) -> object:
        return self.extra

    def set_extra_state(self, state: object) -> None:
        self.loaded = state


def _save(path: Path, objectives: nn.Module) -> Path:
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(path, model=model, optimizer=opt, scheduler=sched,
                           progress=Progress(step=2), config={}, objectives=objectives)


def test_save_converts_numpy_and_dataclasses(tmp_path: Path) -> None:
    extra = {"hist": np.arange(3, dtype=np.int64), "best": np.float32(0.5),
             "stats": Stats(count=2, mean=1.5), "seen": frozenset({1})}
    ckpt = _save(tmp_path / "c", Stateful(extra))
    saved = torch.load(ckpt / STATE, weights_only=True)["objectives"]["_extra_state"]
    assert isinstance(saved["hist"], torch.Tensor) and isinstance(saved["stats"], dict)
    restored = Stateful(None)
    load_checkpoint(ckpt, model=nn.Linear(2, 2), objectives=restored)
    got = restored.loaded
    assert torch.equal(got["hist"], torch.arange(3)) and got["best"] == 0.5
    assert got["stats"] == {"count": 2, "mean": 1.5} and got["seen"] == {1}
    assert torch.equal(restored.queue, torch.arange(4.0))


def test_save_refuses_what_cannot_be_plain(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"objectives.*Touch is not a tensor or a plain type"):
        _save(tmp_path / "c", Stateful({"hook": Touch(tmp_path / "x")}))


def test_plain_state_keeps_unchanged_containers() -> None:
    sd = nn.Linear(2, 2).state_dict()
    assert plain_state(sd) is sd and hasattr(plain_state({"m": sd})["m"], "_metadata")
    converted = plain_state({"m": sd, "n": np.ones(1)})
    assert converted["m"] is sd and torch.equal(converted["n"], torch.ones(1, dtype=torch.float64))
