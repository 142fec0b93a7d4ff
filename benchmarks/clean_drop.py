"""The share of CLEAN rows each curation setting drops, on the built-in data (target < 1%).

    python benchmarks/clean_drop.py --rows 4000

Generates the built-in train split with every noise fraction 0 (so every row is a good row),
reads it, and runs the curation job's stages locally, in plain Python, with the default
settings: the text stage, the image stage, then the whole-dataset dedup rules in plan order
(duplicate key, exact image, near-duplicate image, repeated caption). A row one step rejects
is not seen by the next, as in the job. Prints ONE JSON line: the share of rows each step drops
(``text``, ``image``, ``dedup_key``, ``dedup_exact``, ``dedup_near``, ``repeated_caption``),
their reasons, and, for comparison, the repeated-caption share under ``caption_normaliser``
``digits`` (numbers merged, the rule before issue 21) and ``exact``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vlmray.config.curation import CurationConfig, DedupConfig  # noqa: E402
from vlmray.config.data import NOISE_KINDS, SyntheticConfig  # noqa: E402
from vlmray.data import schema  # noqa: E402
from vlmray.data.curation.dedup import Dedup  # noqa: E402
from vlmray.data.curation.plan import row_stages  # noqa: E402
from vlmray.data.curation.readers import read_inputs_local  # noqa: E402
from vlmray.data.curation.twopass import decide_all  # noqa: E402
from vlmray.data.synthetic import write_synthetic  # noqa: E402

DEDUP_STEP = {"duplicate_key": "dedup_key", "duplicate_image": "dedup_exact",
              "near_duplicate_image": "dedup_near", "repeated_caption": "repeated_caption"}


def clean_rows(rows: int, root: str, seed: int) -> dict[str, np.ndarray]:
    """The built-in train split with no injected noise, read as the curation job reads it."""
    noise = {f"{k}_frac": 0.0 for k in NOISE_KINDS}
    cfg = SyntheticConfig(seed=seed, num_train=rows, num_eval=1, shard_size=1000, **noise)
    write_synthetic(cfg, root)
    return read_inputs_local(str(Path(root) / "train"))


def live(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch[schema.REJECT_REASON] == ""
    return {c: v[keep] for c, v in batch.items()}


def repeated_share(table: dict[str, np.ndarray], n: int, normaliser: str) -> float:
    """Repeated-caption share alone (the other rules off), signatures under ``normaliser``."""
    from vlmray.data.curation.hashing import text_signature

    sigs = np.asarray([text_signature(t, normaliser) for t in table[schema.TEXT]], dtype=object)
    cfg = DedupConfig(keys=False, exact=False, near=False, caption_normaliser=normaliser)
    d = Dedup(cfg).decide({**table, schema.TEXT_SIG: sigs})
    return round(len(d) / n, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    cur = CurationConfig()
    with tempfile.TemporaryDirectory(prefix="vlmray-clean-drop-") as tmp:
        batch = clean_rows(args.rows, tmp, args.seed)
    n = len(batch[schema.KEY])
    dropped: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for stage in row_stages(cur):
        before = int((batch[schema.REJECT_REASON] != "").sum())
        batch = stage(batch)
        hit = batch[schema.REJECT_REASON] != ""
        dropped[stage.name] += int(hit.sum()) - before
    reasons.update(str(r) for r in batch[schema.REJECT_REASON] if r)
    table = live(batch)
    for _, decisions in decide_all(table, [Dedup(cur.dedup)]):
        for reason, count in decisions.counts().items():
            dropped[DEDUP_STEP[reason]] += count
            reasons[reason] += count
    shares = {step: round(dropped[step] / n, 5) for step in
              ("text", "image", *DEDUP_STEP.values())}
    print(json.dumps({
        "rows": n, "clean_drop_share": shares, "reasons": dict(sorted(reasons.items())),
        "total_drop_share": round(sum(dropped.values()) / n, 5),
        "all_under_1pct": all(v < 0.01 for v in shares.values()),
        "repeated_caption_alone": {m: repeated_share(table, n, m)
                                   for m in ("presentation", "exact", "digits")},
        "max_caption_repeats": cur.dedup.max_caption_repeats,
        "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
