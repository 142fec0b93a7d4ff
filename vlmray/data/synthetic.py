"""The built-in dataset: seeded, noisy, web-like image-text pairs of coloured shapes.

Each image shows 1-3 objects of one shape and one colour (4 shapes x 5 colours = 20 classes)
on a light, slightly noisy background; the caption describes count, size, colour, shape and
position in varied words. The train split then gets web noise in configured fractions
(mismatched captions, junk alt-text, near-duplicates, corrupt image bytes, overlong captions);
the eval split is clean. Every sample's JSON sidecar keeps the TRUE label and the noise kind, so
curation stages can measure what they remove.

Every random draw is seeded from ``(seed, split, index)``, so a shard can be generated alone
(in parallel) and the same config always gives byte-identical files.

    python jobs/make_data.py --output /tmp/vlmray-data
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlmray.config.data import NOISE_KINDS, SyntheticConfig
from vlmray.data.schema import BOXES, IMAGE, KEY, LABEL, META, PHRASES, TEXT
from vlmray.data.shards import CLASSES_FILE, write_shard
from vlmray.data.storage import ensure_parent, exists, filesystem, join
from vlmray.data.synthetic_scene import (
    Scene,
    boxes_of,
    jpeg,
    object_mask,
    render,
    rng_for,
    sample_scene,
)
from vlmray.data.synthetic_text import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    caption,
    junk_alt_text,
    stuffed,
)

__all__ = [ "SHAPES", "COLOURS", "CLASSNAMES", "TEMPLATES", "SPLITS",
    "sample_key", "make_sample", "make_shard", "write_synthetic", "ensure_synthetic",
    "CLASSNAME", "COUNT", "SIZE", "NOISE", "SOURCE_KEY", "SHARD", "SHAPE", "OBJECTS",
    "label_map", "has_objects",
]

TEMPLATES = [
    "a photo of a {}.",
    "a picture of {}s.",
    "an image with a {} in it.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
]
SPLITS = ("train", "eval")

# Sidecar / manifest field names that are not sample columns (schema.py owns the columns).
CLASSNAME, COUNT, SIZE, NOISE, SOURCE_KEY = "classname", "count", "size", "noise", "source_key"
SHARD = "shard"                    # manifest: shard file name, e.g. "shard-00000.tar"
SHAPE, OBJECTS = "shape", "objects"  # sidecar: shape name, objects' [cx, cy, r] in [0, 1]


# --- samples -----------------------------------------------------------------------------------

def sample_key(split: str, index: int) -> str:
    """The stable key of sample ``index`` of ``split``, e.g. ``train-000000123``."""
    return f"{split}-{index:09d}"


def _clean(cfg: SyntheticConfig, split: str, index: int) -> tuple[Scene, np.ndarray]:
    """The scene and clean (H, W, 3) uint8 pixels of one sample; pure in (cfg, split, index)."""
    rng = rng_for(cfg.seed, split, index)
    scene = sample_scene(rng)
    return scene, render(scene, rng, cfg.image_size)


def _near_dup(
    cfg: SyntheticConfig, split: str, source: int, rng: np.random.Generator
) -> tuple[Scene, bytes, list[list[float]]]:
    """A web-style copy of sample ``source``: rescaled (75-95%), brightness changed, re-encoded
    at another JPEG quality. Returns (scene, jpeg bytes, boxes; normalised, so unchanged)."""
    scene, pixels = _clean(cfg, split, source)
    gain = rng.uniform(0.94, 1.06)
    pixels = np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    side = max(16, round(cfg.image_size * rng.uniform(0.75, 0.95)))
    pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BICUBIC))
    return scene, jpeg(pixels, int(rng.integers(60, 86))), boxes_of(scene)


def _other_scene(
    cfg: SyntheticConfig, split: str, index: int, scene: Scene, rng: np.random.Generator
) -> Scene:
    """The scene of another sample of the split, of a different class when one turns up."""
    other = scene
    for _ in range(20):
        j = int(rng.integers(cfg.num(split)))
        if j != index:
            other = sample_scene(rng_for(cfg.seed, split, j))
            if other.label != scene.label:
                break
    return other


def _corrupt(image: bytes, rng: np.random.Generator) -> bytes:
    """Bytes PIL cannot decode: the JPEG truncated to 20-60%, or random garbage."""
    if rng.random() < 0.5:
        return image[: int(len(image) * rng.uniform(0.2, 0.6))]
    return rng.bytes(int(rng.integers(100, 1000)))


def make_sample(
    cfg: SyntheticConfig, split: str, index: int, kind: str = "", source: int | None = None
) -> dict[str, Any]:
    """Build sample ``index`` of ``split`` with noise ``kind`` ("" or one of NOISE_KINDS).

    ``source`` is the index a ``near_dup`` copies. Returns ``{KEY, IMAGE (JPEG bytes),
    TEXT (str), META (JSON str: label, classname, boxes, phrases, count, size, noise,
    source_key, shape, objects)}``; the label, boxes, shape and objects always describe the
    image actually encoded (a near_dup is its source rescaled as a whole, so its normalised
    geometry is the source's), and :func:`label_map` re-renders its segmentation.
    """
    if kind not in ("",) + NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {('',) + NOISE_KINDS}")
    rng = rng_for(cfg.seed, split, index, 1)                 # noise/caption stream
    if kind == "near_dup":
        if source is None:
            raise ValueError("a near_dup sample needs the index of its source")
        scene, image, boxes = _near_dup(cfg, split, source, rng)
    else:
        scene, pixels = _clean(cfg, split, index)
        image, boxes = jpeg(pixels), boxes_of(scene)
    text = caption(scene, rng)
    if kind == "mismatch":
        text = caption(_other_scene(cfg, split, index, scene, rng), rng)
    elif kind == "junk":
        text = junk_alt_text(rng)
    elif kind == "corrupt":
        image = _corrupt(image, rng)
    elif kind == "overlong":
        text = stuffed(text, scene, rng, cfg.overlong_chars)
    classname = CLASSNAMES[scene.label]
    meta = {LABEL: scene.label, CLASSNAME: classname, BOXES: boxes,
            PHRASES: [classname] * len(boxes), COUNT: len(scene.objects), SIZE: scene.size,
            NOISE: kind, SOURCE_KEY: sample_key(split, source) if kind == "near_dup" else "",
            SHAPE: SHAPES[scene.shape], OBJECTS: [list(o) for o in scene.objects]}
    return {KEY: sample_key(split, index), IMAGE: image, TEXT: text, META: json.dumps(meta)}


def has_objects(meta: str | dict) -> bool:
    """Whether a sidecar carries what :func:`label_map` needs (older data does not)."""
    if isinstance(meta, (str, bytes)):
        try:
            meta = json.loads(meta)
        except ValueError:                                   # not JSON: no objects either
            return False
    return isinstance(meta, dict) and SHAPE in meta and OBJECTS in meta and LABEL in meta


def label_map(meta: str | dict, size: int) -> np.ndarray:
    """The ground-truth segmentation of a built-in sample, re-rendered from its sidecar:
    int64 (size, size), 0 = background, ``label + 1`` on pixels at least half covered by an
    object (rasterised as ``synthetic_scene.render`` draws them). ``size`` is the side of the
    (square) decoded image; the objects are in normalised coordinates, so any size works."""
    meta = json.loads(meta) if isinstance(meta, (str, bytes)) else meta
    if not has_objects(meta):
        raise ValueError(f"sidecar lacks {SHAPE!r}/{OBJECTS!r}/{LABEL!r} (data written by an "
                         f"older vlmray? regenerate it with jobs/make_data.py)")
    inside = object_mask(meta[SHAPE], [tuple(o) for o in meta[OBJECTS]], size)
    return np.where(inside, int(meta[LABEL]) + 1, 0).astype(np.int64)


# --- shards and the dataset --------------------------------------------------------------------

def _noise_kinds(cfg: SyntheticConfig, split: str) -> list[str]:
    """Noise kind per sample of ``split``: exact counts round(frac * n), seeded shuffle.

    The first sample of each shard is made clean-renderable so near-dups have a source.
    """
    n = cfg.num(split)
    if split != "train":
        return [""] * n
    counts = {k: int(round(getattr(cfg, f"{k}_frac") * n)) for k in NOISE_KINDS}
    while sum(counts.values()) > n:                          # rounding overshoot
        counts[max(counts, key=counts.__getitem__)] -= 1
    kinds = [""] * (n - sum(counts.values()))
    for kind, c in counts.items():
        kinds += [kind] * c
    order = rng_for(cfg.seed, f"{split}:noise", 0).permutation(n)
    kinds = [kinds[i] for i in order]
    for start in range(0, n, cfg.shard_size):
        stop = min(start + cfg.shard_size, n)
        ok = [i for i in range(start, stop) if kinds[i] not in ("near_dup", "corrupt")]
        if ok and ok[0] != start:
            kinds[start], kinds[ok[0]] = kinds[ok[0]], kinds[start]
    return kinds


def make_shard(
    cfg: SyntheticConfig, split: str, shard: int, kinds: list[str] | None = None
) -> list[dict[str, Any]]:
    """The samples of shard ``shard`` of ``split`` (computable alone, given the config).

    ``kinds`` is this shard's slice of the split's noise kinds (computed when None). A
    ``near_dup`` copies a random earlier clean-rendered image of the same shard.
    """
    start = shard * cfg.shard_size
    stop = min(start + cfg.shard_size, cfg.num(split))
    if kinds is None:
        kinds = _noise_kinds(cfg, split)[start:stop]
    rng = rng_for(cfg.seed, f"{split}:shard", shard)
    sources: list[int] = []
    samples = []
    for index, kind in zip(range(start, stop), kinds):
        source = int(sources[int(rng.integers(len(sources)))]) if sources else None
        kind = "" if kind == "near_dup" and source is None else kind
        samples.append(make_sample(cfg, split, index, kind, source))
        if kind not in ("near_dup", "corrupt"):
            sources.append(index)
    return samples


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.tar"


def _shard_task(args: tuple[SyntheticConfig, str, int, list[str], str]) -> list[dict[str, Any]]:
    """Generate and write one shard; return its manifest rows."""
    cfg, split, shard, kinds, root = args
    samples = make_shard(cfg, split, shard, kinds)
    write_shard(root, f"{split}/{_shard_name(shard)}", samples)
    rows = []
    for s in samples:
        meta = json.loads(s[META])
        rows.append({KEY: s[KEY], SHARD: _shard_name(shard), TEXT: s[TEXT],
                     LABEL: meta[LABEL], NOISE: meta[NOISE]})
    return rows


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    ensure_parent(fs, path)
    fs.pipe_file(path, data)


def _write_manifest(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write manifest rows (key, shard, text, label, noise) as one parquet file."""
    cols = (KEY, SHARD, TEXT, LABEL, NOISE)
    table = pa.table({c: [r[c] for r in rows] for c in cols},
                     schema=pa.schema([(c, pa.int64() if c == LABEL else pa.string())
                                       for c in cols]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _write_bytes(uri, buf.getvalue())


def _mp_context() -> multiprocessing.context.BaseContext:
    """A start method that does not fork this (possibly threaded, s3fs-holding) process.

    forkserver (preloading this module, so workers skip the import) where available, else spawn.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _init_worker(env: dict[str, str]) -> None:
    """Give a pool worker this process's current AWS_* settings (a forkserver may predate them)."""
    os.environ.update(env)


def _run(tasks: list[tuple], workers: int) -> list[list[dict[str, Any]]]:
    """Run shard tasks in order, in a spawn process pool when ``workers > 1``."""
    if workers <= 1 or len(tasks) <= 1:
        return [_shard_task(t) for t in tasks]
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_mp_context(),
                             initializer=_init_worker, initargs=(env,)) as pool:
        return list(pool.map(_shard_task, tasks))


def write_synthetic(cfg: SyntheticConfig, root: str, *, workers: int = 1) -> dict[str, Any]:
    """Write the dataset under ``root`` (local path or ``s3://``) and return its summary.

    Layout: ``{train,eval}/shard-NNNNN.tar`` (webdataset: ``{key}.jpg/.txt/.json``),
    ``{train,eval}/manifest.parquet`` (key, shard, text, label, noise),
    ``eval/classes.json`` (classnames, templates), ``dataset.json`` (config and counts).
    """
    tasks = []
    for split in SPLITS:
        kinds = _noise_kinds(cfg, split)
        for shard in range(cfg.num_shards(split)):
            start = shard * cfg.shard_size
            tasks.append((cfg, split, shard, kinds[start:start + cfg.shard_size], root))
    results = _run(tasks, workers)
    summary: dict[str, Any] = {"format": "webdataset", "config": asdict(cfg), "splits": {}}
    for split in SPLITS:
        rows = [r for t, res in zip(tasks, results) if t[1] == split for r in res]
        _write_manifest(join(root, split, "manifest.parquet"), rows)
        noise = Counter(r[NOISE] or "clean" for r in rows)
        summary["splits"][split] = {
            "num_samples": len(rows), "num_shards": cfg.num_shards(split),
            "noise": {k: noise.get(k, 0) for k in ("clean",) + NOISE_KINDS}}
    classes = {"classnames": CLASSNAMES, "templates": TEMPLATES}
    _write_bytes(join(root, "eval", CLASSES_FILE), json.dumps(classes, indent=1).encode())
    _write_bytes(join(root, "dataset.json"), json.dumps(summary, indent=1).encode())
    return summary


def ensure_synthetic(cfg: SyntheticConfig, root: str) -> str:
    """``root``, holding the built-in dataset: generated now unless ``root/dataset.json``
    shows an earlier run already wrote it."""
    if not exists(join(root, "dataset.json")):
        write_synthetic(cfg, root)
    return root
