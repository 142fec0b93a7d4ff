"""The built-in noisy dataset: determinism, layout, noise accounting, and the CLI."""

from __future__ import annotations

import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmray.config.data import NOISE_KINDS, SyntheticConfig
from vlmray.data.schema import IMAGE, KEY, LABEL, META, TEXT
from vlmray.data.shards import iter_shard, iter_shards, load_classes
from vlmray.data.synthetic import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    TEMPLATES,
    make_shard,
    write_synthetic,
)

ROOT = Path(__file__).resolve().parents[2]
CFG = SyntheticConfig(seed=3, num_train=300, num_eval=60, image_size=48, shard_size=100,
                      mismatch_frac=0.1, junk_frac=0.1, near_dup_frac=0.1, corrupt_frac=0.05,
                      overlong_frac=0.05, overlong_chars=500)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    return root, write_synthetic(CFG, str(root))


@pytest.fixture(scope="module")
def train(dataset: tuple[Path, dict]) -> list[dict]:
    rows = list(iter_shards(str(dataset[0] / "train")))
    for row in rows:
        row["m"] = json.loads(row[META])
    return rows


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def _mentions(text: str, colour: str, shape: str) -> bool:
    plural = "es" if shape.endswith("s") else "s"
    return bool(re.search(rf"\b{colour}\b", text, re.I)
                and re.search(rf"\b{shape}(?:{plural})?\b", text, re.I))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_config_gives_identical_bytes(dataset, tmp_path):
    root, _ = dataset
    write_synthetic(CFG, str(tmp_path / "again"))
    first, second = _files(root), _files(tmp_path / "again")
    assert set(first) >= {"dataset.json", "eval/classes.json", "train/manifest.parquet",
                          "eval/manifest.parquet", "train/shard-00002.tar"}
    assert first == second


def test_seed_changes_the_data(dataset, tmp_path):
    other = SyntheticConfig(**{**CFG.__dict__, "seed": 4, "num_train": 100, "num_eval": 1})
    write_synthetic(other, str(tmp_path))
    assert (tmp_path / "train/shard-00000.tar").read_bytes() != \
        (dataset[0] / "train/shard-00000.tar").read_bytes()


def test_shard_is_computable_alone(dataset):
    alone = make_shard(CFG, "train", 1)
    written = list(iter_shard(str(dataset[0] / "train/shard-00001.tar")))
    assert [(s[KEY], s[IMAGE], s[TEXT], s[META]) for s in alone] == \
        [(s[KEY], s[IMAGE], s[TEXT], s[META]) for s in written]


def test_counts_and_manifests_agree(dataset, train):
    root, summary = dataset
    assert json.loads((root / "dataset.json").read_text()) == summary
    manifest = pq.read_table(root / "train/manifest.parquet").to_pylist()
    assert [r[KEY] for r in manifest] == [r[KEY] for r in train]
    assert [f"train-{i:09d}" for i in range(CFG.num_train)] == [r[KEY] for r in train]
    assert [r[TEXT] for r in manifest] == [r[TEXT] for r in train]
    assert [r[LABEL] for r in manifest] == [r["m"]["label"] for r in train]
    assert [r["noise"] for r in manifest] == [r["m"]["noise"] for r in train]
    assert {r["shard"] for r in manifest if r[KEY] == "train-000000150"} == {"shard-00001.tar"}
    splits = summary["splits"]
    assert splits["train"]["num_samples"] == CFG.num_train
    assert splits["train"]["num_shards"] == 3
    assert splits["eval"]["num_samples"] == len(list(iter_shards(str(root / "eval"))))
    assert sum(splits["train"]["noise"].values()) == CFG.num_train


def test_noise_fractions_match_config(dataset, train):
    counts = dataset[1]["splits"]["train"]["noise"]
    for kind in NOISE_KINDS:
        expected = getattr(CFG, f"{kind}_frac") * CFG.num_train
        assert abs(counts[kind] - expected) <= 2, (kind, counts)
        assert counts[kind] == sum(r["m"]["noise"] == kind for r in train)


def test_eval_split_is_clean(dataset):
    rows = list(iter_shards(str(dataset[0] / "eval")))
    assert len(rows) == CFG.num_eval and all(r[KEY].startswith("eval-") for r in rows)
    for row in rows:
        meta = json.loads(row[META])
        assert meta["noise"] == ""
        assert _mentions(row[TEXT], *CLASSNAMES[meta["label"]].split())
        assert _decode(row[IMAGE]).shape == (CFG.image_size, CFG.image_size, 3)


def test_corrupt_images_fail_to_decode_and_others_decode(train):
    corrupt = [r for r in train if r["m"]["noise"] == "corrupt"]
    assert corrupt
    for row in corrupt:
        with pytest.raises(Exception):
            with Image.open(io.BytesIO(row[IMAGE])) as im:
                im.load()
    for row in train:
        if row["m"]["noise"] not in ("corrupt", "near_dup"):
            assert _decode(row[IMAGE]).shape == (CFG.image_size, CFG.image_size, 3)
        elif row["m"]["noise"] == "near_dup":   # a rescaled web copy: 75-95% of the side
            h, w, _ = _decode(row[IMAGE]).shape
            assert h == w and 0.74 * CFG.image_size <= h < CFG.image_size


def test_clean_captions_describe_the_image(train):
    clean = [r for r in train if r["m"]["noise"] in ("", "near_dup", "corrupt", "overlong")]
    for row in clean:
        assert _mentions(row[TEXT], *row["m"]["classname"].split()), row[TEXT]
    for row in train:
        if row["m"]["noise"] in ("mismatch", "junk"):
            assert not _mentions(row[TEXT], *row["m"]["classname"].split()), row[TEXT]


def test_sidecar_is_consistent(train):
    for row in train:
        m = row["m"]
        assert m["classname"] == CLASSNAMES[m["label"]]
        assert m["count"] == len(m["boxes"]) == len(m["phrases"]) and 1 <= m["count"] <= 3
        assert m["phrases"] == [m["classname"]] * m["count"]
        assert m["size"] in ("small", "large")
        assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in m["boxes"])
        assert bool(m["source_key"]) == (m["noise"] == "near_dup")


def test_object_colour_is_where_the_boxes_are(train):
    row = next(r for r in train if r["m"]["noise"] == "" and r["m"]["size"] == "large")
    pixels, (x0, y0, x1, y1) = _decode(row[IMAGE]), row["m"]["boxes"][0]
    s = CFG.image_size
    cx, cy = int((x0 + x1) / 2 * s), int((y0 + y1) / 2 * s)
    colour = row["m"]["classname"].split()[0]
    centre = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
    assert centre.max() - centre.min() > 60, (colour, centre)  # saturated, not the grey bg


def _thumb(data: bytes) -> np.ndarray:
    """A 12x12 mean-centred thumbnail: a crude perceptual hash, robust to shift/brightness."""
    with Image.open(io.BytesIO(data)) as im:
        small = np.asarray(im.convert("RGB").resize((12, 12), Image.Resampling.BOX), np.float32)
    return small - small.mean((0, 1))


def test_near_dups_are_close_to_their_source(train):
    by_key = {r[KEY]: r for r in train}
    originals = {r[KEY]: _thumb(r[IMAGE]) for r in train
                 if r["m"]["noise"] not in ("corrupt", "near_dup")}
    dups = [r for r in train if r["m"]["noise"] == "near_dup"]
    hits = 0
    for row in dups:
        src = by_key[row["m"]["source_key"]]
        assert src[KEY] < row[KEY] and src["m"]["label"] == row["m"]["label"]
        assert int(src[KEY][-9:]) // CFG.shard_size == int(row[KEY][-9:]) // CFG.shard_size
        assert row[IMAGE] != src[IMAGE]
        thumb = _thumb(row[IMAGE])
        dist = {k: float(np.abs(thumb - t).mean()) for k, t in originals.items()}
        assert dist[src[KEY]] < 0.5 * float(np.median(list(dist.values())))
        hits += min(dist, key=dist.__getitem__) == src[KEY]
    assert dups and hits >= 0.9 * len(dups)


def test_overlong_captions_exceed_the_threshold(train):
    lengths = {r["m"]["noise"]: [] for r in train}
    for row in train:
        lengths[row["m"]["noise"]].append(len(row[TEXT]))
    assert min(lengths["overlong"]) > CFG.overlong_chars
    assert max(lengths[""]) < 200


def test_classes_json(dataset):
    classnames, templates = load_classes(str(dataset[0] / "eval"))
    assert classnames == CLASSNAMES and templates == TEMPLATES and len(classnames) == 20
    assert classnames[2 * len(COLOURS) + 3] == f"{COLOURS[3]} {SHAPES[2]}" == "yellow triangle"
    assert all(t.count("{}") == 1 for t in templates)


@pytest.mark.parametrize("field, value", [
    ("num_train", 0), ("image_size", -1), ("shard_size", 0), ("mismatch_frac", 1.5),
    ("corrupt_frac", -0.1), ("overlong_chars", 0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_fractions_summing_over_one_raise():
    with pytest.raises(ValueError, match="sum"):
        SyntheticConfig(mismatch_frac=0.6, junk_frac=0.5)


def test_process_pool_gives_the_same_bytes(dataset, tmp_path):
    small = SyntheticConfig(**{**CFG.__dict__, "num_train": 200, "num_eval": 10})
    write_synthetic(small, str(tmp_path / "one"), workers=1)
    write_synthetic(small, str(tmp_path / "two"), workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs/make_data.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_help():
    out = _cli("--help")
    assert out.returncode == 0 and "--near-dup-frac" in out.stdout and "--output" in out.stdout


def test_cli_writes_shards(tmp_path):
    out = _cli("--output", str(tmp_path / "d"), "--num-train", "30", "--num-eval", "5",
               "--shard-size", "20", "--image-size", "32", "--seed", "7")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["config"]["seed"] == 7 and summary["splits"]["train"]["num_shards"] == 2
    assert sorted(p.name for p in (tmp_path / "d/train").iterdir()) == \
        ["manifest.parquet", "shard-00000.tar", "shard-00001.tar"]
    assert len(list(iter_shards(str(tmp_path / "d/train")))) == 30


def test_cli_rejects_bad_fraction(tmp_path):
    main = runpy.run_path(str(ROOT / "jobs/make_data.py"), run_name="make_data")["main"]
    with pytest.raises(SystemExit, match="junk_frac"):
        main(["--output", str(tmp_path), "--junk-frac", "2"])
    assert not any(tmp_path.iterdir())


def test_perceptual_hashes_find_near_dups_and_separate_distinct_images(train):
    """The property curation's near-duplicate rule relies on: a web-style copy stays within a
    few bits of its source, while distinct images (each with its own backdrop) do not."""
    from vlmray.data.curation.hashing import hamming, phash

    def h(data: bytes) -> int:
        with Image.open(io.BytesIO(data)) as im:
            return phash(im.convert("RGB"))

    by_key = {r[KEY]: r for r in train}
    dups = [r for r in train if r["m"]["noise"] == "near_dup"]
    close = [int(hamming(h(r[IMAGE]), h(by_key[r["m"]["source_key"]][IMAGE]))) <= 4 for r in dups]
    assert dups and sum(close) >= 0.9 * len(dups)
    clean = np.array([h(r[IMAGE]) for r in train if r["m"]["noise"] in ("", "mismatch")])
    d = hamming(clean[:, None], clean[None, :])
    np.fill_diagonal(d, 64)
    assert (d.min(axis=1) <= 4).mean() < 0.02
