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

import functools
import io
import json
import math
import multiprocessing
import os
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from vlmray.data.schema import BOXES, IMAGE, KEY, LABEL, META, PHRASES, TEXT
from vlmray.data.shards import CLASSES_FILE, write_shard
from vlmray.data.storage import ensure_parent, filesystem, join
from vlmray.data.synthetic_text import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    caption,
    junk_alt_text,
    stuffed,
)

__all__ = [
    "SyntheticConfig", "SHAPES", "COLOURS", "CLASSNAMES", "TEMPLATES", "NOISE_KINDS", "SPLITS",
    "sample_key", "make_sample", "make_shard", "write_synthetic",
    "CLASSNAME", "COUNT", "SIZE", "NOISE", "SOURCE_KEY", "SHARD",
]

TEMPLATES = [
    "a photo of a {}.",
    "a picture of {}s.",
    "an image with a {} in it.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
]
NOISE_KINDS = ("mismatch", "junk", "near_dup", "corrupt", "overlong")
SPLITS = ("train", "eval")

# Sidecar / manifest field names that are not sample columns (schema.py owns the columns).
CLASSNAME, COUNT, SIZE, NOISE, SOURCE_KEY = "classname", "count", "size", "noise", "source_key"
SHARD = "shard"                    # manifest: shard file name, e.g. "shard-00000.tar"


@dataclass(kw_only=True)
class SyntheticConfig:
    """How much data to generate and how noisy the train split is."""

    seed: int = 0
    """Master seed; every sample's randomness derives from (seed, split, index)."""
    num_train: int = 8000
    """Number of train samples."""
    num_eval: int = 1000
    """Number of eval samples (always clean)."""
    image_size: int = 64
    """Side of the square images, in pixels."""
    shard_size: int = 1000
    """Samples per .tar shard."""
    mismatch_frac: float = 0.1
    """Train fraction whose caption describes another image."""
    junk_frac: float = 0.05
    """Train fraction with junk alt-text ("IMG_4821.jpg", "click here", ...)."""
    near_dup_frac: float = 0.05
    """Train fraction that is a slightly perturbed copy of an earlier image in its shard."""
    corrupt_frac: float = 0.01
    """Train fraction whose image bytes are truncated or garbage (decode fails)."""
    overlong_frac: float = 0.01
    """Train fraction with keyword-stuffed captions longer than overlong_chars."""
    overlong_chars: int = 2000
    """Overlong captions are longer than this many characters."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "image_size", "shard_size", "overlong_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        for kind in NOISE_KINDS:
            frac = getattr(self, f"{kind}_frac")
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"SyntheticConfig.{kind}_frac must be in [0, 1], got {frac}")
        total = sum(getattr(self, f"{k}_frac") for k in NOISE_KINDS)
        if total > 1.0 + 1e-9:
            fields = ", ".join(f"{k}_frac" for k in NOISE_KINDS)
            raise ValueError(f"SyntheticConfig noise fractions ({fields}) sum to {total} > 1")

    def num(self, split: str) -> int:
        """Number of samples in ``split``."""
        return {"train": self.num_train, "eval": self.num_eval}[split]

    def num_shards(self, split: str) -> int:
        """Number of shards in ``split``."""
        return -(-self.num(split) // self.shard_size)


# --- scenes ------------------------------------------------------------------------------------

_RGB = {"red": (205, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 210),
        "yellow": (235, 205, 30), "purple": (135, 50, 175)}
_RADII = {"small": (0.07, 0.10), "large": (0.14, 0.19)}      # normalised object radius
_REGIONS = {                                                  # where centres may fall
    "left": (0.0, 0.0, 0.42, 1.0), "right": (0.58, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.42), "bottom": (0.0, 0.58, 1.0, 1.0),
    "centre": (0.3, 0.3, 0.7, 0.7), "anywhere": (0.0, 0.0, 1.0, 1.0),
}


@dataclass(frozen=True)
class _Scene:
    """What an image shows; objects are (cx, cy, r) in [0, 1] image coordinates."""

    shape: int
    colour: int
    size: str
    region: str
    objects: tuple[tuple[float, float, float], ...]

    @property
    def label(self) -> int:
        return self.shape * len(COLOURS) + self.colour


def _rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """An independent generator for one (seed, split, index, stream)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, stream])


def _place(rng: np.random.Generator, region: str, count: int, size: str) -> list[tuple]:
    """Sample ``count`` object (cx, cy, r) in ``region``, avoiding overlaps when possible."""
    x0, y0, x1, y1 = _REGIONS[region]
    objects: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = float(rng.uniform(*_RADII[size]))
        lo_x, lo_y = max(x0, r), max(y0, r)
        hi_x, hi_y = max(lo_x, min(x1, 1 - r)), max(lo_y, min(y1, 1 - r))
        for _attempt in range(20):
            cx, cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            if all(math.hypot(cx - ox, cy - oy) > 1.05 * (r + orr) for ox, oy, orr in objects):
                break
        objects.append((cx, cy, r))
    return objects


def _sample_scene(rng: np.random.Generator) -> _Scene:
    """Draw a scene: class, count (1-3), size, region and object placements."""
    shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    count = int(rng.integers(1, 4))
    size = ("small", "large")[int(rng.integers(2))]
    region = list(_REGIONS)[int(rng.integers(len(_REGIONS)))]
    return _Scene(shape, colour, size, region, tuple(_place(rng, region, count, size)))


# Object extent around its centre, in units of r: (left, up, right, down).
_EXTENT = {"circle": (1.0, 1.0, 1.0, 1.0), "square": (0.85, 0.85, 0.85, 0.85),
           "triangle": (0.95, 1.0, 0.95, 0.8), "cross": (1.0, 1.0, 1.0, 1.0)}


def _polygons(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) that draw a square, triangle or cross."""
    if shape == "square":
        h = 0.85 * r
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]]
    w = 0.35 * r                                              # cross: two bars
    return [[(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
          fill: tuple[int, int, int]) -> None:
    """Draw one object centred at (cx, cy) with radius r, in pixels."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    for poly in _polygons(shape, cx, cy, r):
        draw.polygon(poly, fill=fill)


def _boxes(scene: _Scene) -> list[list[float]]:
    """Normalised (x0, y0, x1, y1) box per object, clipped to [0, 1]."""
    left, up, right, down = _EXTENT[SHAPES[scene.shape]]
    out = []
    for cx, cy, r in scene.objects:
        box = (cx - left * r, cy - up * r, cx + right * r, cy + down * r)
        out.append([round(min(max(v, 0.0), 1.0), 4) for v in box])
    return out


@functools.lru_cache(maxsize=4)
def _noise_bank(n: int) -> np.ndarray:
    """A fixed bank of 4n triangular int16 noise values in [-15, 15] (std ~6.5)."""
    raw = np.random.default_rng(n).integers(0, 16, (2, 4 * n), dtype=np.int16)
    return raw[0] + raw[1] - 15


def _backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, per-image background pattern: three low-frequency waves (int16, (S, S, 1)).

    Web photos differ in their low frequencies; without this, every built-in image would be a
    nearly flat field and perceptual hashes of distinct images would collide."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(3):
        kx, ky = (int(v) for v in rng.integers(-2, 3, 2))
        kx = kx if (kx, ky) != (0, 0) else 1
        phase = rng.uniform(0, 2 * np.pi)
        field += rng.uniform(10, 22) * np.cos(2 * np.pi * (kx * x + ky * y) + phase)
    return field.astype(np.int16)[..., None]


def _render(scene: _Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw the scene: (size, size, 3) uint8. Drawn at 2x and box-downsampled (anti-aliasing),
    over a smooth per-image backdrop; pixel noise is a seeded window into a fixed noise bank
    (much cheaper than fresh draws)."""
    big = 2 * size
    grey = rng.uniform(175, 245)
    background = tuple(int(min(255.0, grey + t)) for t in rng.uniform(-12, 12, 3))
    canvas = Image.new("RGB", (big, big), background)
    mask = Image.new("L", (big, big), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    base = _RGB[COLOURS[scene.colour]]
    for cx, cy, r in scene.objects:
        fill = tuple(min(255, max(0, b + int(j))) for b, j in zip(base, rng.integers(-18, 19, 3)))
        _draw(draw, SHAPES[scene.shape], cx * big, cy * big, r * big, fill)
        _draw(draw_mask, SHAPES[scene.shape], cx * big, cy * big, r * big, 255)
    pixels = np.asarray(canvas.reduce(2), dtype=np.float32)    # (H, W, 3)
    behind = 1.0 - np.asarray(mask.reduce(2), dtype=np.float32)[..., None] / 255.0
    pixels = (pixels + behind * _backdrop(rng, size)).astype(np.int16)
    n = pixels.size
    start = int(rng.integers(0, 3 * n))
    noise = _noise_bank(n)[start:start + n].reshape(pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """Encode (H, W, 3) uint8 as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# --- samples -----------------------------------------------------------------------------------

def sample_key(split: str, index: int) -> str:
    """The stable key of sample ``index`` of ``split``, e.g. ``train-000000123``."""
    return f"{split}-{index:09d}"


def _clean(cfg: SyntheticConfig, split: str, index: int) -> tuple[_Scene, np.ndarray]:
    """The scene and clean (H, W, 3) uint8 pixels of one sample; pure in (cfg, split, index)."""
    rng = _rng(cfg.seed, split, index)
    scene = _sample_scene(rng)
    return scene, _render(scene, rng, cfg.image_size)


def _near_dup(
    cfg: SyntheticConfig, split: str, source: int, rng: np.random.Generator
) -> tuple[_Scene, bytes, list[list[float]]]:
    """A web-style copy of sample ``source``: rescaled (75-95%), brightness changed, re-encoded
    at another JPEG quality. Returns (scene, jpeg bytes, boxes; normalised, so unchanged)."""
    scene, pixels = _clean(cfg, split, source)
    gain = rng.uniform(0.94, 1.06)
    pixels = np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    side = max(16, round(cfg.image_size * rng.uniform(0.75, 0.95)))
    pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BICUBIC))
    return scene, _jpeg(pixels, int(rng.integers(60, 86))), _boxes(scene)


def _other_scene(
    cfg: SyntheticConfig, split: str, index: int, scene: _Scene, rng: np.random.Generator
) -> _Scene:
    """The scene of another sample of the split, of a different class when one turns up."""
    other = scene
    for _ in range(20):
        j = int(rng.integers(cfg.num(split)))
        if j != index:
            other = _sample_scene(_rng(cfg.seed, split, j))
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
    source_key)}``; the label always describes the image actually encoded.
    """
    if kind not in ("",) + NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {('',) + NOISE_KINDS}")
    rng = _rng(cfg.seed, split, index, 1)                 # noise/caption stream
    if kind == "near_dup":
        if source is None:
            raise ValueError("a near_dup sample needs the index of its source")
        scene, image, boxes = _near_dup(cfg, split, source, rng)
    else:
        scene, pixels = _clean(cfg, split, index)
        image, boxes = _jpeg(pixels), _boxes(scene)
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
            NOISE: kind, SOURCE_KEY: sample_key(split, source) if kind == "near_dup" else ""}
    return {KEY: sample_key(split, index), IMAGE: image, TEXT: text, META: json.dumps(meta)}


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
    order = _rng(cfg.seed, f"{split}:noise", 0).permutation(n)
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
    rng = _rng(cfg.seed, f"{split}:shard", shard)
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
