"""The sharded index build against a single-process ``build_index``, and the reference split.

    pytest tests/retrieval/test_build.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.retrieval.build import build_sharded
from vlmray.retrieval.index import BuiltIndex, IndexConfig, build_index
from vlmray.retrieval.split import reference_mask

N, D = 2000, 16
CUTS = (0, 600, 610, 1400, N)          # uneven shards, one tiny


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, D)).astype(np.float32)
    x = centres[rng.integers(0, 20, N)] + 0.3 * rng.standard_normal((N, D)).astype(np.float32)
    keys = np.array([f"row-{i:05d}" for i in range(N)], dtype=object)
    queries = rng.standard_normal((40, D)).astype(np.float32)
    return x, keys, queries


def shards_of(x: np.ndarray, keys: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[a:b], keys[a:b]) for a, b in zip(CUTS, CUTS[1:])]


def same(a: BuiltIndex, b: BuiltIndex, queries: np.ndarray) -> None:
    sa, ka = a.search(queries, 10)
    sb, kb = b.search(queries, 10)
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_allclose(sa, sb, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.keys, b.keys)
    for name in ("kind", "n", "dim", "nlist", "nprobe", "recall_at_10"):
        assert a.report.get(name) == b.report.get(name), name


@pytest.mark.parametrize("kind,metric", [("flat", "ip"), ("ivf_flat", "ip"), ("ivf_flat", "l2")])
def test_sharded_equals_single_process(data, kind, metric) -> None:
    x, keys, queries = data
    cfg = IndexConfig(kind=kind, metric=metric, nlist=16 if kind != "flat" else 0)
    single = build_index(x, keys, cfg, queries_holdout=200)
    sharded = build_sharded(shards_of(x, keys), cfg, queries_holdout=200)
    same(single, sharded, queries)
    assert sharded.report["shards"] == 4 and sharded.report["parallel"] == 0
    _, hit = sharded.search(x[[5, 1500]], 1)                # keys line up with their rows
    assert list(hit[:, 0]) == ["row-00005", "row-01500"]


def test_sharded_in_ray_tasks_equals_single_process(ray_local, data) -> None:
    x, keys, queries = data
    cfg = IndexConfig(kind="ivf_flat", nlist=16)
    single = build_index(x, keys, cfg, queries_holdout=200)
    sharded = build_sharded(shards_of(x, keys), cfg, parallel=2, queries_holdout=200)
    same(single, sharded, queries)
    assert sharded.report["parallel"] == 2


def test_hnsw_shards_added_in_order(data) -> None:
    x, keys, _ = data
    built = build_sharded(shards_of(x, keys), IndexConfig(kind="hnsw", hnsw_m=8),
                          queries_holdout=100)
    assert built.index.ntotal == N and list(built.keys) == list(keys)
    _, hit = built.search(x[[0, 700, 1999]], 1)
    assert list(hit[:, 0]) == ["row-00000", "row-00700", "row-01999"]


def test_sharded_rejects_bad_input(data) -> None:
    x, keys, _ = data
    with pytest.raises(ValueError, match="0 vectors"):
        build_sharded([(x[:0], keys[:0])], IndexConfig())
    with pytest.raises(ValueError, match="dimensions"):
        build_sharded([(x[:5], keys[:5]), (x[5:9, :8], keys[5:9])], IndexConfig())
    with pytest.raises(ValueError, match="keys for"):
        build_sharded([(x[:5], keys[:4])], IndexConfig())


def test_reference_split_is_stable_and_sized() -> None:
    keys = [f"train-{i:09d}" for i in range(5000)]
    ref = reference_mask(keys, 0.2, seed=3)
    assert ref.dtype == bool and abs(ref.mean() - 0.2) < 0.03
    order = np.random.default_rng(1).permutation(len(keys))
    np.testing.assert_array_equal(reference_mask([keys[i] for i in order], 0.2, seed=3),
                                  ref[order])                         # per key, not position
    np.testing.assert_array_equal(reference_mask(keys[:100], 0.2, seed=3), ref[:100])
    assert (reference_mask(keys, 0.2, seed=4) != ref).any()          # the seed matters
    assert not reference_mask(keys, 0.0).any() and reference_mask(keys, 1.0).all()
    assert (ref <= reference_mask(keys, 0.5, seed=3)).all()          # nested as fraction grows
    with pytest.raises(ValueError, match="fraction"):
        reference_mask(keys, 1.5)
    # pinned: the split must not change across versions or machines (no Python hash)
    assert reference_mask(list("abcdef"), 0.5).tolist() == [False, True, True, False, True, True]
