"""vlmray.retrieval.search: exclusion rules against a brute-force reference, the stages in
process and through Ray Data, and the online search actor queried from a Ray task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.data import schema
from vlmray.data.curation.stage import apply_stage
from vlmray.retrieval.attach import AttachConfig, AttachNeighbours
from vlmray.retrieval.index import BuiltIndex, IndexConfig, build_index
from vlmray.retrieval.search import (
    SearchActor,
    SearchConfig,
    SearchStage,
    as_list,
    search_excluding,
    start_search_actor,
)

DIM, N, K = 16, 300, 5


def clustered(n: int, dim: int = DIM, clusters: int = 30, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` centres; row 2i+1 is a near-copy of row 2i for
    the first 20 rows (cosine > 0.999), so near-duplicates exist."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * 0.5 / dim**0.5
    x[1:20:2] = x[0:20:2] + rng.standard_normal((10, dim)) * 1e-3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def keys_for(n: int) -> np.ndarray:
    return np.array([f"k{i:04d}" for i in range(n)], dtype=object)


def reference(base: np.ndarray, keys: np.ndarray, queries: np.ndarray, k: int, *,
              exclude: list[np.ndarray], threshold: float | None, metric: str) -> list[list[str]]:
    """Plain NumPy top-k with the same exclusion rules, for comparison."""
    if metric == "ip":
        sim = queries.astype(np.float64) @ base.astype(np.float64).T       # (Q, N)
        order, near = np.argsort(-sim, axis=1, kind="stable"), sim >= (threshold or np.inf)
    else:
        d = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")
        near = d <= threshold if threshold is not None else np.zeros_like(d, bool)
    out = []
    for q, row in enumerate(order):
        skip = {col[q] for col in exclude}
        out.append([keys[j] for j in row if keys[j] not in skip and not near[q, j]][:k])
    return out


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(N)


@pytest.fixture(scope="module")
def index_dir(data: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("search") / "index")
    build_index(data, list(keys_for(N)), IndexConfig(kind="flat")).save(uri)
    return uri


@pytest.fixture(scope="module")
def table_dir(data: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Embedding shards in the embed stage's format: two part files, texts ``caption i``."""
    root = tmp_path_factory.mktemp("embeds")
    typ = pa.list_(pa.float32(), DIM)
    text_embed = -data                                             # distinguishable from images
    for part, lo in enumerate(range(0, N, 150)):
        rows = slice(lo, lo + 150)
        pq.write_table(pa.table({
            schema.KEY: pa.array(list(keys_for(N)[rows]), pa.string()),
            schema.TEXT: pa.array([f"caption {i}" for i in range(lo, lo + 150)], pa.string()),
            schema.IMAGE_EMBED: pa.FixedSizeListArray.from_arrays(data[rows].ravel(), type=typ),
            schema.TEXT_EMBED: pa.FixedSizeListArray.from_arrays(text_embed[rows].ravel(),
                                                                type=typ),
        }), root / f"part-{part:05d}.parquet")
    return str(root)


def rows_batch(data: np.ndarray, rows: np.ndarray, *, as_lists: bool = False) -> dict:
    """A NumPy batch of ``rows``: key, text, image_embed (2-D, or an object column of lists),
    duplicate_of (row 3 duplicates row 200)."""
    emb = data[rows]
    if as_lists:
        col = np.empty(len(rows), dtype=object)
        for i, v in enumerate(emb):
            col[i] = v.tolist()
        emb = col
    dup = np.array(["k0200" if r == 3 else "" for r in rows], dtype=object)
    return {schema.KEY: keys_for(N)[rows], schema.TEXT: np.array([f"own {r}" for r in rows],
                                                                  dtype=object),
            schema.IMAGE_EMBED: emb, schema.DUPLICATE_OF: dup}


# --- plain Python ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (SearchConfig, {"index": "x", "query_column": "image"}, "valid choices"),
    (SearchConfig, {"index": "x", "k": 0}, "SearchConfig.k"),
    (SearchConfig, {"index": "x", "overfetch": -1}, "overfetch"),
    (AttachConfig, {"table": "t", "references": False}, "nothing to attach"),
    (AttachConfig, {"table": "t", "num_cpus": 0}, "AttachConfig.num_cpus"),
])
def test_bad_config_fails_clearly(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("as_lists", [False, True])
def test_stage_excludes_self_duplicate_of_and_near_duplicates(
        data: np.ndarray, index_dir: str, as_lists: bool) -> None:
    rows = np.arange(40)
    stage = SearchStage(SearchConfig(index=index_dir, k=K, duplicate_threshold=0.95))
    out = stage(rows_batch(data, rows, as_lists=as_lists))
    batch = rows_batch(data, rows)
    want = reference(data, keys_for(N), data[rows], K, threshold=0.95, metric="ip",
                     exclude=[batch[schema.KEY], batch[schema.DUPLICATE_OF]])
    got = [as_list(c) for c in out[schema.NEIGHBOURS]]
    assert got == want
    scores = [as_list(c) for c in out[schema.NEIGHBOUR_SCORES]]
    for i, (hits, sc) in enumerate(zip(got, scores)):
        assert len(hits) == len(sc) == K and f"k{i:04d}" not in hits
        assert sc == sorted(sc, reverse=True) and max(sc) < 0.95
    assert "k0200" not in got[3]
    assert "k0001" not in got[0] and "k0000" not in got[1]                     # near-copies


def test_threshold_off_keeps_near_copies_first(data: np.ndarray, index_dir: str) -> None:
    stage = SearchStage(SearchConfig(index=index_dir, k=K, duplicate_threshold=None))
    out = stage(rows_batch(data, np.arange(4)))
    assert [as_list(c)[0] for c in out[schema.NEIGHBOURS]] == ["k0001", "k0000", "k0003",
                                                                "k0002"]


def test_fewer_than_k_results_are_padded_or_short(data: np.ndarray, tmp_path: Path) -> None:
    keys = keys_for(5)
    built = build_index(data[:5], list(keys), IndexConfig(kind="flat"))
    scores, hits = search_excluding(built, data[:2], 8, exclude=[keys[:2]])
    assert hits.shape == (2, 8) and (hits[:, :4] != "").all() and (hits[:, 4:] == "").all()
    assert np.isneginf(scores[:, 4:]).all() and "k0000" not in hits[0]
    built.save(str(tmp_path / "small"))
    stage = SearchStage(SearchConfig(index=str(tmp_path / "small"), k=8,
                                     duplicate_threshold=None))
    out = stage({schema.KEY: keys[:2], schema.IMAGE_EMBED: data[:2]})
    assert [len(as_list(c)) for c in out[schema.NEIGHBOURS]] == [4, 4]


def test_l2_metric_threshold_is_a_squared_distance(data: np.ndarray) -> None:
    base = data * 3.0                                                   # not unit norm
    keys = keys_for(N)
    built = build_index(base, list(keys), IndexConfig(kind="flat", metric="l2"))
    threshold = 0.5
    scores, hits = search_excluding(built, base[:40], K, exclude=[keys[:40]],
                                    duplicate_threshold=threshold)
    want = reference(base, keys, base[:40], K, exclude=[keys[:40]], threshold=threshold,
                     metric="l2")
    assert [list(r) for r in hits] == want
    assert (scores > threshold).all() and (np.diff(scores, axis=1) >= 0).all()


def test_short_rows_are_searched_again(data: np.ndarray) -> None:
    base = np.concatenate([np.repeat(data[:1], 30, axis=0), data[100:]])   # 30 copies of one
    keys = keys_for(len(base))
    built = build_index(base, list(keys), IndexConfig(kind="flat"))
    _, hits = search_excluding(built, base[:1], 3, duplicate_threshold=0.95, overfetch=0)
    assert (hits != "").all() and not set(hits[0]) & set(keys[:30])


def test_rejected_rows_pass_through_with_empty_lists(data: np.ndarray, index_dir: str) -> None:
    batch = rows_batch(data, np.arange(6))
    batch[schema.REJECT_REASON] = np.array(["", "bad", "", "", "bad", ""], dtype=object)
    out = SearchStage(SearchConfig(index=index_dir, k=K))(batch)
    assert [len(as_list(c)) for c in out[schema.NEIGHBOURS]] == [K, 0, K, K, 0, K]
    assert out[schema.NEIGHBOURS][1].type == pa.string()


def test_attach_references_and_neighbour_text(data: np.ndarray, table_dir: str) -> None:
    neighbours = np.empty(4, dtype=object)
    for i, v in enumerate([["k0005", "k0007"], [], ["missing", "k0009"], None]):
        neighbours[i] = v
    batch = {schema.KEY: keys_for(4), schema.NEIGHBOURS: neighbours,
             schema.TEXT: np.array(["a", "b", "c", "d"], dtype=object),
             schema.REJECT_REASON: np.array(["", "", "", "bad"], dtype=object)}
    out = AttachNeighbours(AttachConfig(table=table_dir, k=3, neighbour_text=True))(batch)
    img, txt, mask = (out[c] for c in (schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS,
                                       schema.REF_MASK))
    assert img.shape == txt.shape == (4, 3, DIM) and img.dtype == np.float32
    np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(img[0, :2], data[[5, 7]])
    np.testing.assert_array_equal(txt[2, 0], -data[9])
    assert not img[0, 2].any() and not img[1].any() and not img[3].any()
    assert list(out[schema.NN_TEXT]) == ["caption 5", "b", "caption 9", ""]


# --- through Ray -------------------------------------------------------------------------------


def test_stages_through_ray_data_match_in_process(ray_local: None, data: np.ndarray,
                                                  index_dir: str, table_dir: str,
                                                  tmp_path: Path) -> None:
    import ray.data

    search = SearchStage(SearchConfig(index=index_dir, k=K, batch_size=50, num_cpus=0.5))
    attach = AttachNeighbours(AttachConfig(table=table_dir, k=K, neighbour_text=True,
                                           batch_size=50, num_cpus=0.5))
    batch = rows_batch(data, np.arange(N))
    batch[schema.REJECT_REASON] = np.where(np.arange(N) < 100, "bad", "").astype(object)
    items = [{c: v[i] for c, v in batch.items()} for i in range(N)]
    ds = apply_stage(apply_stage(ray.data.from_items(items, override_num_blocks=3), search),
                     attach).materialize()
    types = ds.schema().base_schema                # an all-rejected block types them too
    assert types.field(schema.NEIGHBOURS).type == pa.list_(pa.string())
    assert types.field(schema.NEIGHBOUR_SCORES).type == pa.list_(pa.float32())
    got = {r[schema.KEY]: r for r in ds.take_all()}
    want = attach(search(batch))
    for i, key in enumerate(want[schema.KEY]):
        assert list(got[key][schema.NEIGHBOURS]) == as_list(want[schema.NEIGHBOURS][i])
        np.testing.assert_allclose(got[key][schema.NEIGHBOUR_SCORES],
                                   as_list(want[schema.NEIGHBOUR_SCORES][i]), rtol=1e-6)
        np.testing.assert_array_equal(got[key][schema.REF_IMAGE_EMBEDS],
                                      want[schema.REF_IMAGE_EMBEDS][i])
        assert got[key][schema.NN_TEXT] == want[schema.NN_TEXT][i]
    refs = ds.select_columns([schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK])
    torch_batch = next(iter(refs.iter_torch_batches(batch_size=64)))
    assert tuple(torch_batch[schema.REF_IMAGE_EMBEDS].shape) == (64, K, DIM)
    assert tuple(torch_batch[schema.REF_MASK].shape) == (64, K)
    ds.select_columns([schema.KEY, schema.NEIGHBOURS]).write_parquet(str(tmp_path / "out"))
    assert pq.read_table(tmp_path / "out").column(schema.NEIGHBOURS).type.value_type == \
        pa.string()


def test_search_actor_from_a_task_matches_index(ray_local: None, data: np.ndarray,
                                                index_dir: str) -> None:
    import ray

    handle = start_search_actor(index_dir, name="vlmray-test-search", num_cpus=0.5)

    @ray.remote(num_cpus=0.5)
    def worker(queries: np.ndarray) -> tuple:
        actor = start_search_actor(index_dir, name="vlmray-test-search")   # get, not create
        return ray.get(actor.search.remote(queries, 8)), ray.get(actor.info.remote())

    try:
        (scores, hits), info = ray.get(worker.remote(data[:20] + 0.01))
        want_scores, want_hits = BuiltIndex.load(index_dir).search(data[:20] + 0.01, 8)
        np.testing.assert_array_equal(hits, want_hits)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
        assert info == {"n": N, "dim": DIM, "kind": "flat", "metric": "ip"}
        excl = ray.get(handle.search.remote(data[:20], 8, list(keys_for(20))))
        local = SearchActor(index_dir).search(data[:20], 8, list(keys_for(20)))
        np.testing.assert_array_equal(excl[1], local[1])
        assert not (excl[1] == keys_for(20)[:, None]).any()
    finally:
        ray.kill(handle)
