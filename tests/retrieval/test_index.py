"""vlmray.retrieval.index: kind choice, build + auto-tune per kind, search, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from vlmray.retrieval.index import (
    BuiltIndex,
    IndexConfig,
    add_shards,
    build_index,
    choose_kind,
    exact_topk,
    recall_at_k,
)

DIM = 32


def clustered(n: int, dim: int = DIM, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """``n`` float32 points around ``clusters`` unit-norm centres (noise ~0.5 of the norm)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
    return (centres[rng.integers(0, clusters, n)] + noise).astype(np.float32)


def keys_for(n: int) -> list[str]:
    return [f"k{i:06d}" for i in range(n)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(4000)


@pytest.mark.parametrize(("n", "dim", "budget_mb", "expected"), [
    (10_000, 64, 1024, "flat"),
    (49_999, 64, 1024, "flat"),
    (50_000, 64, 1024, "ivf_flat"),
    (1_000_000, 256, 4096, "ivf_flat"),
    (1_000_000, 256, 512, "ivf_pq"),
    (10_000, 64, 1, "ivf_pq"),           # small but over budget: compress
])
def test_choose_kind_auto(n: int, dim: int, budget_mb: float, expected: str) -> None:
    assert choose_kind(n, dim, IndexConfig(memory_budget_mb=budget_mb)) == expected


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_choose_kind_explicit_is_respected(kind: str) -> None:
    assert choose_kind(10**9, 1024, IndexConfig(kind=kind, memory_budget_mb=1)) == kind


@pytest.mark.parametrize(("field", "value", "message"), [
    ("kind", "ivf", "valid choices"),
    ("metric", "cosine", "valid choices"),
    ("nprobe", -1, "nprobe"),
    ("target_recall", 1.5, "target_recall"),
    ("memory_budget_mb", 0, "memory_budget_mb"),
])
def test_bad_config_fails_naming_choices(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        IndexConfig(**{field: value})
    if message == "valid choices":
        assert "'flat'" in str(info.value) or "'ip'" in str(info.value)


def test_recall_at_k_counts_overlap_and_ignores_missing() -> None:
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    approx = np.array([[3, 9, 1], [5, 4, 7]])
    assert recall_at_k(approx, exact) == pytest.approx(4 / 5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_self_match_first(data: np.ndarray, metric: str) -> None:
    keys = keys_for(len(data))
    built = build_index(data, keys, IndexConfig(metric=metric, memory_budget_mb=64))
    assert built.report["kind"] == "flat" and built.report["recall_at_10"] == 1.0
    scores, hits = built.search(data[:200], k=5)
    assert hits[:, 0].tolist() == keys[:200]
    assert scores.dtype == np.float32 and scores.shape == (200, 5)
    order = -1 if metric == "ip" else 1  # best first
    assert np.all(np.diff(scores * order, axis=1) >= -1e-5)


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_approximate_kinds_reach_target_and_find_duplicates(data: np.ndarray, kind: str) -> None:
    keys = keys_for(len(data))
    built = build_index(data, keys, IndexConfig(kind=kind), queries_holdout=300)
    report = built.report
    assert report["kind"] == kind and report["n"] == len(data) and report["dim"] == DIM
    assert report["target_reached"] and report["recall_at_10"] >= 0.95
    assert ("nprobe" if kind == "ivf_flat" else "efSearch") in report
    _, hits = built.search(data[:300], k=10)
    found = np.mean([keys[i] in hits[i] for i in range(300)])
    assert found >= 0.95
    # recall of the search itself against exact top-10 on fresh near-data queries
    rng = np.random.default_rng(7)
    queries = data[rng.choice(len(data), 200, replace=False)] + 0.01
    base = data / np.linalg.norm(data, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact = exact_topk(base, qn, 10, "ip")
    _, approx = built.search(queries, k=10)
    approx_ids = np.vectorize(lambda k: int(k[1:]))(approx)
    assert recall_at_k(approx_ids, exact) >= 0.9


def test_ivf_pq_builds_compresses_and_reports_honestly(data: np.ndarray) -> None:
    keys = keys_for(len(data))
    cfg = IndexConfig(kind="ivf_pq", nlist=32, train_sample=2000)
    built = build_index(data, keys, cfg, queries_holdout=300)
    report = built.report
    assert report["pq_m"] == DIM // 4 and report["nlist"] == 32
    assert report["bytes"] < len(data) * DIM * 4 / 2  # well under raw float32
    assert report["target_reached"] == (report["recall_at_10"] >= cfg.target_recall)
    _, hits = built.search(data[:200], k=10)
    assert np.mean([keys[i] in hits[i] for i in range(200)]) >= 0.9


def test_auto_tuning_doubles_nprobe_until_target(data: np.ndarray) -> None:
    keys = keys_for(len(data))
    loose = build_index(data, keys, IndexConfig(kind="ivf_flat", target_recall=0.5))
    tight = build_index(data, keys, IndexConfig(kind="ivf_flat", target_recall=0.99))
    for built in (loose, tight):
        nprobe = built.report["nprobe"]
        assert nprobe & (nprobe - 1) == 0 or nprobe == built.report["nlist"]
        assert built.report["recall_at_10"] >= built.cfg.target_recall
    assert loose.report["nprobe"] <= tight.report["nprobe"]
    fixed = build_index(data, keys, IndexConfig(kind="ivf_flat", nprobe=3))
    assert fixed.report["nprobe"] == 3


def test_missing_results_come_back_empty() -> None:
    vectors = clustered(5)
    built = build_index(vectors, keys_for(5), IndexConfig())
    scores, hits = built.search(vectors[:2], k=8)
    assert hits.shape == (2, 8) and hits.dtype == object
    assert all(h != "" for h in hits[:, :5].ravel())
    assert all(h == "" for h in hits[:, 5:].ravel())
    assert np.all(np.isneginf(scores[:, 5:]))


def test_keys_must_match_vectors() -> None:
    with pytest.raises(ValueError, match="keys"):
        build_index(clustered(10), keys_for(9), IndexConfig())


def _roundtrip(uri: str, built: BuiltIndex, queries: np.ndarray) -> None:
    built.save(uri)
    loaded = BuiltIndex.load(uri)
    assert loaded.report == built.report and loaded.cfg == built.cfg
    assert loaded.keys.tolist() == built.keys.tolist()
    s0, k0 = built.search(queries, k=10)
    s1, k1 = loaded.search(queries, k=10)
    np.testing.assert_array_equal(k0, k1)
    np.testing.assert_allclose(s0, s1)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_save_load_roundtrip_local(tmp_path, data: np.ndarray, kind: str) -> None:
    built = build_index(data, keys_for(len(data)), IndexConfig(kind=kind), queries_holdout=200)
    _roundtrip(str(tmp_path / "idx"), built, data[:100] + 0.01)


def test_save_load_roundtrip_s3(s3_bucket: str, data: np.ndarray) -> None:
    built = build_index(data, keys_for(len(data)), IndexConfig(kind="ivf_flat"),
                        queries_holdout=200)
    _roundtrip(f"{s3_bucket}/indexes/v1", built, data[:100] + 0.01)


def test_add_shards_appends_vectors_and_keys(data: np.ndarray) -> None:
    keys = keys_for(len(data))
    built = build_index(data[:2000], keys[:2000], IndexConfig(kind="ivf_flat"))
    add_shards(built, [(data[2000:3000], keys[2000:3000]), (data[3000:], keys[3000:])])
    assert built.index.ntotal == len(data) == len(built.keys) == built.report["n"]
    _, hits = built.search(data[2000:], k=10)
    assert np.mean([keys[2000 + i] in hits[i] for i in range(len(hits))]) >= 0.95
