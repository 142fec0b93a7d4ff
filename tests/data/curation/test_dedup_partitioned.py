"""Partitioned dedup: the same decisions as ``Dedup.decide`` over the whole table (rows,
reasons, duplicate_of) for 1, 3 and 16 partitions on synthetic tables with planted duplicates
of every kind; the storage primitives (stable partitions, scatter files read one partition at
a time, band routes); and the global step through Ray tasks on a local Ray.

    python -m pytest tests/data/curation/test_dedup_partitioned.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.config.curation import DedupConfig, ScoreConfig
from vlmray.data import schema
from vlmray.data.curation import dedup_near as dn
from vlmray.data.curation import dedup_partitioned as dp
from vlmray.data.curation import scatter as sc
from vlmray.data.curation.dedup import (
    DUPLICATE_IMAGE,
    DUPLICATE_KEY,
    NEAR_DUPLICATE_IMAGE,
    REASONS,
    REPEATED_CAPTION,
    Dedup,
    band_blocks,
    band_masks,
)
from vlmray.data.curation.hashing import text_signature
from vlmray.data.curation.score import TopFraction
from vlmray.data.curation.stage import Decisions
from vlmray.data.curation.twopass import (
    FileDecisions,
    compact_columns,
    decide_all,
    global_decisions,
    read_compact,
)

BOILERPLATE = ["click here", "image", "DSC0001.jpg", "a photo of a red car on the street",
               "a photo of a red car on the street at night", "stock photo", ""]


def flip(h: int, bits) -> int:
    u = np.asarray(h, dtype=np.int64).view(np.uint64)
    for b in bits:
        u = u ^ np.uint64(1 << int(b))
    return int(u.view(np.int64))


def synthetic(n: int, seed: int, threshold: int = 4) -> dict[str, np.ndarray]:
    """Live rows of 5 input files in shuffled order: repeated and empty keys, sha256s and
    captions, near-duplicate phashes within and just past ``threshold``, chains a ~ b ~ c."""
    rng = np.random.default_rng(seed)
    files = rng.integers(0, 5, n)
    ids = (files.astype(np.int64) << 32) | rng.permutation(10 * n)[:n].astype(np.int64)
    keys = np.array([f"k{i}" for i in range(n)], dtype=object)
    sha = np.array([f"s{i}" for i in range(n)], dtype=object)
    for col, rate in ((keys, 0.05), (sha, 0.08)):
        rep = rng.random(n) < rate
        col[rep] = col[rng.integers(0, n, int(rep.sum()))]
        col[rng.random(n) < 0.03] = ""
    hashes = rng.integers(-2**63, 2**63 - 1, n)
    for dst in np.flatnonzero(rng.random(n) < 0.3):           # near / exact phash repeats
        k = int(rng.integers(0, threshold + 2))
        hashes[dst] = flip(hashes[rng.integers(0, n)], rng.choice(64, k, replace=False))
    for a in rng.integers(0, n, 20):                         # chains a ~ b ~ c, c far from a
        bits = rng.choice(64, 2 * max(threshold, 1), replace=False)
        b, c = rng.integers(0, n, 2)
        hashes[b] = flip(hashes[a], bits[:threshold])
        hashes[c] = flip(hashes[b], bits[threshold:])
    text = np.array([f"caption number {i} of a thing" for i in range(n)], dtype=object)
    boiler = rng.random(n) < 0.3
    text[boiler] = np.array(BOILERPLATE, dtype=object)[rng.integers(0, len(BOILERPLATE),
                                                                    int(boiler.sum()))]
    return {schema.ROW_ID: ids, schema.KEY: keys, schema.SHA256: sha, schema.PHASH: hashes,
            schema.TEXT_SIG: np.array([text_signature(t) if t else "" for t in text], object),
            schema.TEXT: text, schema.CLIP_SCORE: rng.random(n)}


def write_compact(table: dict[str, np.ndarray], root: Path, files: int = 4,
                  rejected: np.ndarray | None = None) -> str:
    """``table`` as ``files`` parquet files (rows in table order), like pass 1's output; with
    ``rejected``, a REJECT_REASON column (staged rows) marking those rows not live."""
    root.mkdir(parents=True, exist_ok=True)
    cols = dict(table)
    if rejected is not None:
        cols[schema.REJECT_REASON] = np.where(rejected, "decode_error", "").astype(object)
    n = len(cols[schema.ROW_ID])
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(pa.table({c: v[part].tolist() for c, v in cols.items()}),
                       root / f"block_{i:03d}.parquet")
    return str(root)


def read_decisions(root: Path, name: str = "dedup") -> dict[int, tuple[str, str]]:
    present = json.loads((root / name / "_files.json").read_text())
    assert sorted(present) == present
    out: dict[int, tuple[str, str]] = {}
    for f in present:
        t = pq.read_table(root / name / f"file-{f:08d}.parquet").to_pydict()
        assert t[schema.ROW_ID] == sorted(t[schema.ROW_ID])
        assert {r >> 32 for r in t[schema.ROW_ID]} == {f}
        out.update({r: (why, of) for r, why, of in zip(t[schema.ROW_ID], t[schema.REJECT_REASON],
                                                       t[schema.DUPLICATE_OF])})
    return out


def expected(d: Decisions) -> dict[int, tuple[str, str]]:
    assert d.duplicate_of is not None
    return {int(r): (str(w), str(o or "")) for r, w, o in zip(d.row_ids, d.reasons,
                                                             d.duplicate_of)}


CONFIGS = {
    "default": DedupConfig(max_caption_repeats=2),
    "wide": DedupConfig(phash_threshold=10, max_caption_repeats=0),
    "exact_phash_only": DedupConfig(keys=False, exact=False, phash_threshold=0),
    "jaccard": DedupConfig(caption_jaccard=0.5, max_caption_repeats=1),
    "keys_and_sha": DedupConfig(near=False, captions=False),
    "near_first": DedupConfig(keys=False, exact=False, captions=False, phash_threshold=6),
    "captions_only": DedupConfig(keys=False, exact=False, near=False, max_caption_repeats=0),
}


@pytest.mark.parametrize("parts", [1, 3, 16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_partitioned_decisions_equal_the_whole_table(tmp_path: Path, name: str,
                                                     parts: int) -> None:
    cfg = CONFIGS[name]
    table = synthetic(1500, seed=len(name), threshold=cfg.phash_threshold)
    want = expected(Dedup(cfg).decide(table))
    assert len(want) > 50
    compact = write_compact(table, tmp_path / "sig")
    summary = dp.decide_partitioned(Dedup(cfg), compact, str(tmp_path / "dec"), parts)
    assert read_decisions(tmp_path / "dec") == want
    assert summary["live_rows"] == 1500 and summary["partitions"] == parts
    assert summary["rejected"] == Decisions(
        row_ids=np.array(list(want), dtype=np.int64),
        reasons=np.array([w for w, _ in want.values()], dtype=object)).counts()
    assert not (tmp_path / "dec" / "_dedup-partitions").exists()     # scratch removed


@pytest.mark.parametrize("threshold", [4, 6])
def test_band_keys_chosen_for_many_rows_give_the_same_decisions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int) -> None:
    """The band keys a hundred million hashes get (longer keys, several per route) on a small
    table: the same pairs, so the same decisions."""
    monkeypatch.setattr(dn, "band_blocks", lambda n, t: band_blocks(10**8, t))
    groups = dn.routes(1500, threshold, 3)
    assert max(len(g) - 1 for g in groups) > 1                # a route searches several keys
    cfg = DedupConfig(phash_threshold=threshold, max_caption_repeats=2)
    table = synthetic(1500, seed=threshold, threshold=threshold)
    want = expected(Dedup(cfg).decide(table))
    assert sum(w == NEAR_DUPLICATE_IMAGE for w, _ in want.values()) > 100
    compact = write_compact(table, tmp_path / "sig")
    dp.decide_partitioned(Dedup(cfg), compact, str(tmp_path / "dec"), 3)
    assert read_decisions(tmp_path / "dec") == want


def test_every_reason_and_cross_partition_chains(tmp_path: Path) -> None:
    """One table where every rule fires, near-duplicate parents lie in other phash partitions,
    and staged rows (REJECT_REASON) that are not live take no part."""
    cfg = DedupConfig(max_caption_repeats=3)
    table = synthetic(3000, seed=11)
    dead = np.random.default_rng(0).random(3000) < 0.1
    live = {c: v[~dead] for c, v in table.items()}
    want = expected(Dedup(cfg).decide(live))
    assert {w for w, _ in want.values()} == set(REASONS)
    compact = write_compact(table, tmp_path / "sig", files=7, rejected=dead)
    summary = dp.decide_partitioned(Dedup(cfg), compact, str(tmp_path / "dec"), 16)
    assert summary["live_rows"] == int((~dead).sum())
    assert read_decisions(tmp_path / "dec") == want
    near = [r for r, (w, _) in want.items() if w == NEAR_DUPLICATE_IMAGE]
    key_row = dict(zip(live[schema.KEY], live[schema.ROW_ID]))
    phash = dict(zip(live[schema.ROW_ID].tolist(), live[schema.PHASH]))
    parts = {r: int(sc.partition_of(np.array([phash[r]]), 16, np.array([r]))[0]) for r in phash}
    crossing = [r for r in near if parts[r] != parts[key_row[want[r][1]]]]
    assert len(crossing) > 20


# --- the storage primitives ------------------------------------------------------------------


def test_partition_of_is_stable_across_processes_and_spreads_empty_values() -> None:
    values = np.array(["a", "b", "a", "", None, "", "c"] * 30, dtype=object)
    ids = np.arange(len(values), dtype=np.int64)
    parts = sc.partition_of(values, 16, ids)
    assert len(set(parts[values == "a"].tolist())) == 1
    assert len(set(parts[(values == "") | np.equal(values, None)].tolist())) > 8   # by ROW_ID
    code = ("import numpy as np; from vlmray.data.curation.dedup_partitioned import "
            "partition_of as p; v=np.array(['a','b','c','dd'],dtype=object); "
            "print(p(v, 97, np.arange(4)).tolist(), "
            "p(np.array([-5, 2**62]), 97, np.arange(2)).tolist())")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in "12"}
    assert len(seen) == 1


def test_scatter_writes_a_row_group_per_partition_and_gather_reads_one(tmp_path: Path) -> None:
    ids = np.arange(100, dtype=np.int64)
    part = (ids * 7) % 5
    chunks = [(sc.to_table({schema.ROW_ID: ids[:60], schema.KEY: ids[:60].astype(str)}), part[:60]),
              (sc.to_table({schema.ROW_ID: ids[60:], schema.KEY: ids[60:].astype(str)}),
               part[60:] + 5)]
    uri = sc.scatter(str(tmp_path / "s.parquet"), chunks)
    assert pq.ParquetFile(uri).num_row_groups == 10
    for q in range(10):
        got = sc.gather([uri], q, [schema.ROW_ID, schema.KEY])
        want = [i for i in range(100) if (part[i] + (5 if i >= 60 else 0)) == q]
        assert sorted(got[schema.ROW_ID].to_pylist()) == want
    assert sc.gather([uri], 11, [schema.ROW_ID]).num_rows == 0
    assert sc.gather([uri], None, [schema.ROW_ID]).num_rows == 100
    assert sc.scatter(str(tmp_path / "empty.parquet"), []) is None
    pq.write_table(pa.table({schema.ROW_ID: ids, sc.PART: pa.array(part, pa.int32())}),
                   tmp_path / "mixed.parquet")
    with pytest.raises(ValueError, match="row group"):
        sc.gather([str(tmp_path / "mixed.parquet")], 0, [schema.ROW_ID])


@pytest.mark.parametrize("n,threshold,parts", [(1000, 4, 3), (10**8, 4, 200), (10**9, 8, 200),
                                               (10**5, 6, 16)])
def test_routes_hold_every_band_key_once(n: int, threshold: int, parts: int) -> None:
    groups = dn.routes(n, threshold, parts)
    masks = [m for _, *ms in groups for m in ms]
    assert sorted(masks) == sorted(band_masks(n, threshold))
    for route, *ms in groups:
        assert all(route & m == route for m in ms)          # a route is part of its keys
        assert route.bit_count() >= min(min(m.bit_count() for m in ms),
                                        np.log2(parts) + dn.ROUTE_SPREAD_BITS)
    if n >= 10**8:
        assert len(groups) < len(masks) / 2                 # fewer copies of each hash


def test_declines_for_one_partition_and_checks_settings(tmp_path: Path) -> None:
    compact = write_compact(synthetic(200, seed=1), tmp_path / "sig")
    out = str(tmp_path / "dec")
    assert Dedup(DedupConfig()).decide_uri(compact, out) is None          # auto: < 5M rows
    assert Dedup(DedupConfig(partitions=1)).decide_uri(compact, out) is None
    assert not (tmp_path / "dec").exists()
    with pytest.raises(ValueError, match="partitions"):
        DedupConfig(partitions=-1)
    thin = write_compact({c: v for c, v in synthetic(50, seed=2).items() if c != schema.PHASH},
                         tmp_path / "thin")
    with pytest.raises(KeyError, match="phash"):
        dp.decide_partitioned(Dedup(), thin, out, 3)
    empty = dp.decide_partitioned(Dedup(), str(tmp_path / "nothing"), out, 3)
    assert empty == {"live_rows": 0, "rejected": {}, "partitions": 3}
    assert json.loads((tmp_path / "dec" / "dedup" / "_files.json").read_text()) == []


def test_live_table_drops_earlier_rejections_batch_by_batch(tmp_path: Path) -> None:
    table = synthetic(400, seed=5)
    compact = write_compact(table, tmp_path / "sig", files=3)
    dp.decide_partitioned(Dedup(), compact, str(tmp_path / "dec"), 3)
    rejected = set(read_decisions(tmp_path / "dec"))
    earlier = [FileDecisions(str(tmp_path / "dec"), "dedup")]
    got = dp.live_table(compact, [schema.ROW_ID, schema.CLIP_SCORE], earlier)
    want = sorted(set(table[schema.ROW_ID].tolist()) - rejected)
    assert got[schema.ROW_ID].tolist() == want and len(got[schema.CLIP_SCORE]) == len(want)


# --- through the global step on Ray ------------------------------------------------------------


def test_global_step_runs_partitioned_dedup_as_ray_tasks(ray_local, tmp_path: Path) -> None:
    import ray.data

    table = synthetic(1200, seed=3)
    rows = {c: v.tolist() for c, v in table.items()}
    rows[schema.REJECT_REASON] = [""] * 1200
    rows[schema.REJECT_REASON][::25] = ["decode_error"] * 48           # not live: not decided
    items = [dict(zip(rows, v)) for v in zip(*rows.values())]
    cfg = DedupConfig(max_caption_repeats=2, partitions=3)
    stages = [Dedup(cfg), TopFraction(ScoreConfig(model="x", keep_top_fraction=0.6))]
    summary = global_decisions(lambda: ray.data.from_items(items, override_num_blocks=4),
                               stages, str(tmp_path / "cache"), fingerprint="fp")
    compact = read_compact(summary["signatures"], compact_columns(stages))
    want = dict(decide_all(compact, stages))
    root = Path(summary["decisions"])
    assert read_decisions(root, "dedup") == expected(want["dedup"])
    top = read_decisions(root, "score_top_fraction")
    assert sorted(top) == want["score_top_fraction"].row_ids.tolist()
    assert summary["live_rows"] == 1152 and summary["partitions"] == {"dedup": 3}
    assert summary["rejected"] == {g.name: want[g.name].counts() for g in stages}
    assert set(summary["rejected"]["dedup"]) == {DUPLICATE_KEY, DUPLICATE_IMAGE,
                                                 NEAR_DUPLICATE_IMAGE, REPEATED_CAPTION}
    assert not any(p.name.startswith("_dedup") for p in root.iterdir())
