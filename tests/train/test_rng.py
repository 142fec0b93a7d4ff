"""Generator states for exact resume (``vlmray.train.rng``) and the ``extra`` of checkpoints.

Capture/restore on torch, NumPy and Python's ``random``; the states and nested numpy state
through ``save_checkpoint`` / ``load_checkpoint``; ``gather`` on a real 2-process gloo group;
``restore_for_rank`` restoring on the same world size and reseeding on another.

    pytest tests/train/test_rng.py -q
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed._spawn import run_gloo
from vlmray.distributed import Dist
from vlmray.train import rng
from vlmray.train.checkpoint import Progress, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def keep_global_generators() -> Iterator[None]:
    """The tests seed the global generators: put them back afterwards."""
    with torch.random.fork_rng(devices=[]):
        np_state, py_state = np.random.get_state(), random.getstate()
        yield
        np.random.set_state(np_state)
        random.setstate(py_state)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def draws() -> tuple[list[float], list[float], list[float]]:
    """Some draws of each generator, Gaussian ones included (they use cached values)."""
    t = torch.rand(5).tolist() + torch.randn(3).tolist()
    n = np.random.rand(5).tolist() + np.random.standard_normal(3).tolist()
    p = [random.random() for _ in range(5)] + [random.gauss(0, 1) for _ in range(3)]
    return t, n, p


def test_capture_then_restore_repeats_every_generator() -> None:
    seed_all(3)
    np.random.standard_normal(1)          # leave a cached Gaussian in NumPy and in Python
    random.gauss(0, 1)
    state = rng.capture()
    first = draws()
    seed_all(99)
    assert draws() != first
    rng.restore(state)
    assert draws() == first
    rng.restore(state)                    # restoring does not consume the saved state
    assert draws() == first


def test_capture_is_plain_and_loads_with_weights_only() -> None:
    seed_all(4)
    state = rng.capture()
    assert set(state) == {"version", "torch", "cuda", "numpy", "python"}
    assert isinstance(state["python"]["internal"], list)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    first = draws()
    rng.restore(loaded)
    assert draws() == first


def _save(path: Path, extra: dict[str, Any] | None) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched,
                    progress=Progress(step=7), config={"k": 1}, extra=extra)


def _load(path: Path, extra: dict[str, Any] | None) -> Progress:
    return load_checkpoint(path, model=nn.Linear(3, 2), extra=extra)


def test_extra_round_trips_rng_states_and_nested_numpy(tmp_path: Path) -> None:
    seed_all(5)
    states = [rng.capture()]
    seed_all(6)
    states.append(rng.capture())
    bitmap = np.packbits(np.arange(21) % 3 == 0)
    extra = {
        "rng": states,
        "cursor": {"sources": [{"epoch": 2, "batch": 17, "order": [3, 1, 2]},
                               {"epoch": np.int64(0), "batch": 4, "order": []}],
                   "samples": 1 << 40},
        "bitmap": bitmap,
        "nested": [np.arange(4, dtype=np.int32),
                   {"mask": np.array([[True, False]]), "big": np.array([2**40], np.int64)},
                   (np.zeros((2, 0), np.float32), 5)],
        "tensor": torch.arange(3),
    }
    _save(tmp_path / "c", extra)
    got: dict[str, Any] = {"old": 1}
    assert _load(tmp_path / "c", got).step == 7
    assert got.pop("old") == 1 and set(got) == set(extra)
    assert got["cursor"] == {"sources": [{"epoch": 2, "batch": 17, "order": [3, 1, 2]},
                                         {"epoch": 0, "batch": 4, "order": []}],
                             "samples": 1 << 40}
    assert isinstance(got["bitmap"], np.ndarray) and got["bitmap"].dtype == np.uint8
    np.testing.assert_array_equal(got["bitmap"], bitmap)
    a, b, (c, five) = got["nested"]
    for want, have in ((extra["nested"][0], a), (extra["nested"][1]["mask"], b["mask"]),
                       (extra["nested"][1]["big"], b["big"]), (extra["nested"][2][0], c)):
        assert isinstance(have, np.ndarray) and have.dtype == want.dtype
        np.testing.assert_array_equal(have, want)
    assert five == 5 and torch.equal(got["tensor"], extra["tensor"])
    for saved, loaded in zip(states, got["rng"]):
        rng.restore(saved)
        want = draws()
        rng.restore(loaded)
        assert draws() == want


def test_extra_is_empty_for_a_checkpoint_without_it(tmp_path: Path) -> None:
    _save(tmp_path / "c", None)
    got: dict[str, Any] = {}
    assert _load(tmp_path / "c", got).step == 7 and got == {}
    assert _load(tmp_path / "c", None).step == 7          # not asked for: fine either way
    _save(tmp_path / "d", {"a": 1})
    assert _load(tmp_path / "d", None).step == 7


def _gather_worker(rank: int, world_size: int) -> tuple[Any, dict[str, Any]]:
    seed_all(100 + rank)
    dist = Dist.from_env()
    assert (dist.rank, dist.world_size) == (rank, world_size)
    return rng.gather(dist), rng.capture()


def test_gather_brings_every_ranks_state_to_rank_zero() -> None:
    (gathered, own0), (other, own1) = run_gloo(_gather_worker, 2)
    assert other is None
    assert len(gathered) == 2
    for got, own in zip(gathered, (own0, own1)):
        assert torch.equal(got["torch"], own["torch"])
        assert torch.equal(got["numpy"]["keys"], own["numpy"]["keys"])
        assert got["python"] == own["python"]
    assert not torch.equal(gathered[0]["torch"], gathered[1]["torch"])
    assert gathered[0]["python"] != gathered[1]["python"]
    seed_all(100 + 1)
    want = draws()
    rng.restore(gathered[1])
    assert draws() == want


def test_gather_on_one_process_is_the_capture() -> None:
    seed_all(8)
    [state] = rng.gather(Dist())
    first = draws()
    rng.restore(state)
    assert draws() == first


def test_restore_for_rank_restores_on_the_same_world_size() -> None:
    states = []
    for r in range(2):
        seed_all(10 + r)
        states.append(rng.capture())
    seed_all(11)
    want = draws()
    seed_all(0)
    assert rng.restore_for_rank(states, rank=1, world_size=2, seed=0, step=3) == "restored"
    assert draws() == want


def test_restore_for_rank_reseeds_deterministically_otherwise() -> None:
    seed_all(10)
    states = [rng.capture(), rng.capture()]

    def after(states: list | None, rank: int, world: int, step: int = 3) -> tuple:
        assert rng.restore_for_rank(states, rank=rank, world_size=world, seed=1,
                                    step=step) == "reseeded"
        return draws()

    first = after(states, 0, 3)               # the world grew from 2 to 3
    assert after(states, 0, 3) == first
    assert after(None, 0, 3) == first         # an old checkpoint: the same seeds
    assert after([], 0, 1) == first
    others = [after(states, 1, 3), after(states, 2, 3), after(states, 0, 3, step=4)]
    for other in others:
        assert all(o != f for o, f in zip(other, first))   # each generator differs
    assert len({repr(o) for o in others}) == 3
    rng.restore(states[0])
    assert draws() != first                   # not what the saved state would draw
