"""Dist collectives over 2 and 3 real gloo processes, and the 1-process identity behaviour.

Three processes matter: at W=2 rank r+1 and rank r-1 are the same peer, so a ring step sent the
wrong way round (forward or backward) still passes; at W=3 they differ and the checks below see it.

    pytest tests/distributed -q
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.distributed._spawn import run_gloo
from vlmray.distributed import Dist

B, D = 3, 2
WORLD_SIZES = (2, 3)


def _x(rank: int) -> torch.Tensor:
    """Rank r's local (B, D) tensor; distinct values per rank and row."""
    return torch.arange(B * D, dtype=torch.float64).reshape(B, D) + 100.0 * rank


def _weights(rank: int, world: int) -> torch.Tensor:
    """A rank-specific (W*B, D) weight, so each rank's loss sum(gathered * w_r) differs."""
    rows = world * B
    return (rank + 1.0) * torch.linspace(-1, 1, rows * D, dtype=torch.float64).reshape(rows, D)


def _gather_checks(dist: Dist, rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for with_grad in (True, False):
        x = _x(rank).requires_grad_()
        gathered = dist.all_gather(x, with_grad=with_grad)
        (gathered * _weights(rank, dist.world_size)).sum().backward()
        out[f"gather_{with_grad}"] = (gathered.detach(), x.grad)
    x3 = torch.randn(B, 2, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    out["gather_3d"] = (x3, dist.all_gather(x3))
    return out


def _exchange_checks(dist: Dist, rank: int) -> dict[str, Any]:
    x = _x(rank).requires_grad_()
    received = dist.neighbour_exchange(x)
    coeff = (rank + 1.0) * torch.arange(B * D, dtype=torch.float64).reshape(B, D)
    (received * coeff).sum().backward()
    return {"exchange": (received.detach(), x.grad)}


def _uneven_error(dist: Dist, rank: int) -> str:
    try:
        dist.all_gather(torch.zeros(B + rank, D))
    except ValueError as err:
        return str(err)
    return ""


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    dist = Dist.current()
    out = {"rank": dist.rank, "world": dist.world_size, "is_main": dist.is_main}
    out.update(_gather_checks(dist, rank))
    out.update(_exchange_checks(dist, rank))
    out["offsets"] = dist.offsets(4)
    out["sum"] = dist.all_reduce_sum(torch.tensor([rank + 1.0, 10.0]))
    out["mean"] = dist.all_reduce_mean(rank + 1.0)
    out["metrics"] = dist.all_reduce_metrics({"b": 2.0 * rank, "a": 1.0})
    out["uneven"] = _uneven_error(dist, rank)
    dist.barrier()
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_gloo(_worker, request.param)


def test_dist_from_process_group(results: list[dict[str, Any]]) -> None:
    W = len(results)
    assert [(r["rank"], r["world"], r["is_main"]) for r in results] == [
        (rank, W, rank == 0) for rank in range(W)]


def test_all_gather_with_grad(results: list[dict[str, Any]]) -> None:
    W = len(results)
    expected = torch.cat([_x(r) for r in range(W)])
    total_weight = sum(_weights(s, W) for s in range(W))  # d(sum_s L_s)/d gathered
    for rank, res in enumerate(results):
        gathered, grad = res["gather_True"]
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(grad, total_weight[rank * B:(rank + 1) * B])


def test_all_gather_without_grad_keeps_only_own_slot(results: list[dict[str, Any]]) -> None:
    W = len(results)
    expected = torch.cat([_x(r) for r in range(W)])
    for rank, res in enumerate(results):
        gathered, grad = res["gather_False"]
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(grad, _weights(rank, W)[rank * B:(rank + 1) * B])  # own loss


def test_all_gather_multidim(results: list[dict[str, Any]]) -> None:
    expected = torch.cat([res["gather_3d"][0] for res in results])
    for res in results:
        torch.testing.assert_close(res["gather_3d"][1], expected)


def test_neighbour_exchange_forward_and_backward(results: list[dict[str, Any]]) -> None:
    """Forward: rank r holds r-1's tensor. Backward: the gradient comes back from r+1. At W=3
    each of the two directions, flipped alone or both together, breaks one of the asserts."""
    W = len(results)
    for rank, res in enumerate(results):
        received, grad = res["exchange"]
        torch.testing.assert_close(received, _x((rank - 1) % W))
        # x_r was received by rank r+1, whose loss weights it by (r+2) * arange.
        receiver = (rank + 1) % W
        coeff = (receiver + 1.0) * torch.arange(B * D, dtype=torch.float64).reshape(B, D)
        torch.testing.assert_close(grad, coeff)


def test_offsets_and_reductions(results: list[dict[str, Any]]) -> None:
    W = len(results)
    for rank, res in enumerate(results):
        assert res["offsets"].dtype == torch.long
        assert res["offsets"].tolist() == list(range(4 * rank, 4 * rank + 4))
        torch.testing.assert_close(res["sum"], torch.tensor([W * (W + 1) / 2, 10.0 * W]))
        assert float(res["mean"]) == pytest.approx((W + 1) / 2)
        assert res["metrics"] == {"a": pytest.approx(1.0), "b": pytest.approx(W - 1.0)}


def test_uneven_batches_raise_on_every_rank(results: list[dict[str, Any]]) -> None:
    batches = str({rank: B + rank for rank in range(len(results))})  # "{0: 3, 1: 4, ...}"
    for res in results:
        assert "same local batch shape" in res["uneven"] and batches in res["uneven"]


def test_world_size_one_is_identity() -> None:
    dist = Dist.current()
    assert (dist.rank, dist.world_size, dist.is_main) == (0, 1, True)
    x = torch.randn(3, 4, requires_grad=True)
    assert dist.all_gather(x) is x and dist.all_gather(x, with_grad=False) is x
    assert dist.neighbour_exchange(x) is x
    assert dist.offsets(3).tolist() == [0, 1, 2]
    torch.testing.assert_close(dist.all_reduce_mean(x), x.detach())
    assert not dist.all_reduce_sum(x).requires_grad
    assert dist.all_reduce_metrics({"a": 2.0}) == {"a": 2.0}
    dist.barrier()


def test_offsets_arithmetic_and_rank_validation() -> None:
    assert Dist(rank=2, world_size=4).offsets(5).tolist() == [10, 11, 12, 13, 14]
    with pytest.raises(ValueError, match="rank"):
        Dist(rank=2, world_size=2)
