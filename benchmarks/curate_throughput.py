"""Curation throughput: the Ray Data pipeline with 1 and 2 CPUs against a plain PIL loop.

    python benchmarks/curate_throughput.py --images 4000 --side 1024 --output runs/bench-curate

Input: ``--images`` photos (scikit-image's samples, randomly cropped, scaled to about
``--side`` pixels, lightly noised and re-encoded as JPEG, so no two are near-duplicates) with
captions, in ``--files`` webdataset shards. Every phase does the same work on the same input:
read shards, clean and check captions, decode (JPEG draft mode when shrinking), fix
orientation and mode, check size and aspect, resize to 256 on the shorter side, re-encode JPEG,
hash (sha256 + perceptual hash), deduplicate, write fixed-size shards.

- ``plain``: one Python process, a for-loop over samples with PIL, no Ray;
- ``ray_1cpu`` / ``ray_2cpu``: ``vlmray.pipelines.curate.run`` on a fresh local Ray with that many
  logical CPUs (Ray's start-up is not timed; everything inside ``run`` is).

Prints ONE JSON line: images/s of each, ``ray_1cpu_vs_plain`` (target >= 1) and
``ray_2cpu_vs_1cpu`` (target >= 1.8), and the CPU load other processes put on the machine.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from vlmray.config.curation import DedupConfig  # noqa: E402
from vlmray.data import schema  # noqa: E402
from vlmray.data.curation.dedup import Dedup
from vlmray.data.curation.hashing import phash, sha256_hex, text_signature  # noqa: E402
from vlmray.data.shards import encode_shard, iter_shards  # noqa: E402

_SAMPLES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
            "hubble_deep_field.jpg", "immunohistochemistry.png", "logo.png")
_WORDS = "a photo of the red blue small large old new cat cup rocket person sky bike".split()


def make_input(root: Path, n: int, side: int, files: int, seed: int = 0) -> Path:
    """``n`` distinct JPEG photos with captions in ``files`` shards under ``root/in``."""
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    bases = [Image.open(data_dir / s).convert("RGB") for s in _SAMPLES if (data_dir / s).exists()]
    rng = np.random.default_rng(seed)
    out = root / "in"
    out.mkdir(parents=True, exist_ok=True)
    per = -(-n // files)
    for f in range(files):
        samples = []
        for i in range(f * per, min(n, (f + 1) * per)):
            base = bases[i % len(bases)]
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = base.crop((x, y, x + cw, y + ch)).resize((side, side * 3 // 4), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (side * 3 // 4, side, 3))
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            text = " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 12))))
            samples.append({schema.KEY: f"{i:08d}", schema.IMAGE: buf.getvalue(),
                            schema.TEXT: text, schema.META: json.dumps({"i": i})})
        (out / f"in-{f:05d}.tar").write_bytes(encode_shard(samples)[0])
    return out


# --- the plain loop -----------------------------------------------------------------------------

_TAG, _SPACE = re.compile(r"<[^>]+>"), re.compile(r"\s+")


def _plain_image(data: bytes, target: int = 256) -> tuple[bytes, int] | None:
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if im.format == "JPEG" and min(w, h) > 2 * target:
        im.draft("RGB", (w * target // min(w, h), h * target // min(w, h)))
    im = ImageOps.exif_transpose(im).convert("RGB")
    if min(w, h) < 16 or max(w, h) / min(w, h) > 3.0:
        return None
    scale = target / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue(), phash(im)


def plain_loop(src: Path, out: Path, shard_size: int) -> int:
    """Read, clean, decode, check, resize, re-encode, hash, dedup, write: one process."""
    kept = []
    for s in iter_shards(str(src)):
        text = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(s[schema.TEXT] or ""))).strip()
        if not 3 <= len(text) <= 1000:
            continue
        try:
            result = _plain_image(s[schema.IMAGE])
        except Exception:  # noqa: BLE001
            continue
        if result is not None:
            kept.append({**s, schema.TEXT: text, schema.IMAGE: result[0], schema.PHASH: result[1],
                         schema.SHA256: sha256_hex(s[schema.IMAGE]),
                         schema.TEXT_SIG: text_signature(text)})
    table = {c: np.asarray([r[c] for r in kept], dtype=object)
             for c in (schema.KEY, schema.SHA256, schema.TEXT_SIG)}
    table[schema.PHASH] = np.asarray([r[schema.PHASH] for r in kept], dtype=np.int64)
    table[schema.ROW_ID] = np.arange(len(kept), dtype=np.int64)
    drop = set(Dedup(DedupConfig()).decide(table).row_ids.tolist())
    kept = [r for i, r in enumerate(kept) if i not in drop]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(kept), shard_size):
        shard = encode_shard(kept[i:i + shard_size])[0]
        (out / f"part-{i // shard_size:05d}.tar").write_bytes(shard)
    return len(kept)


# --- phases -------------------------------------------------------------------------------------


def _cpu_busy() -> float:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]


def ray_phase(src: str, out: str, cpus: int) -> dict:
    """Child process: a fresh local Ray with ``cpus`` logical CPUs, then one timed run."""
    import ray

    from vlmray.config.curation import WriteConfig
    from vlmray.config.jobs import CurateJobConfig
    from vlmray.pipelines.curate import run

    tmp = tempfile.mkdtemp(prefix="vrb-", dir="/tmp")
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    t0 = time.perf_counter()
    stats = run(CurateJobConfig(input=src, output=out, write=WriteConfig(shard_size=250))).stats
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"wall_s": wall, "rows_in": stats["rows_in"], "rows_out": stats["rows_out"]}


def timed(fn, *args) -> tuple[dict, float]:
    jiffies = os.sysconf("SC_CLK_TCK")
    busy0, own0, t0 = _cpu_busy(), os.times(), time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    own1 = os.times()
    own = (own1.user + own1.system + own1.children_user + own1.children_system
           - own0.user - own0.system - own0.children_user - own0.children_system)
    others = max(0.0, (_cpu_busy() - busy0) / jiffies - own) / wall
    return result, round(others, 3)


def _child(src: str, out: str, cpus: int) -> dict:
    cmd = [sys.executable, __file__, "--child", src, out, str(cpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--output", default="")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(ray_phase(args.child[0], args.child[1], int(args.child[2]))))
        return
    root = Path(args.output or tempfile.mkdtemp(prefix="vlmray-bench-curate-"))
    src = make_input(root, args.images, args.side, args.files)
    t0 = time.perf_counter()
    (kept, plain_others) = timed(plain_loop, src, root / "plain", 250)
    plain_s = time.perf_counter() - t0
    r1 = _child(str(src), str(root / "ray1"), 1)
    r2 = _child(str(src), str(root / "ray2"), 2)
    n = args.images
    fig = {"images": n, "side": args.side, "files": args.files, "cores": os.cpu_count(),
           "plain_images_per_s": round(n / plain_s, 1),
           "ray_1cpu_images_per_s": round(n / r1["wall_s"], 1),
           "ray_2cpu_images_per_s": round(n / r2["wall_s"], 1),
           "rows_out": {"plain": kept, "ray_1cpu": r1["rows_out"], "ray_2cpu": r2["rows_out"]},
           "other_tenants_cores": {"plain": plain_others}}
    fig["ray_1cpu_vs_plain"] = round(fig["ray_1cpu_images_per_s"] / fig["plain_images_per_s"], 3)
    fig["ray_2cpu_vs_1cpu"] = round(fig["ray_2cpu_images_per_s"] / fig["ray_1cpu_images_per_s"], 3)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
