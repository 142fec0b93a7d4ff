"""FAISS index benchmark: exact Flat against the automatically chosen approximate index.

    python benchmarks/faiss_index.py --n 1000000 --dim 256 --queries 1000

Data: ``--n`` L2-normalised vectors around ``--clusters`` random unit centres (Gaussian
noise of ``--noise`` times the centre's norm), not uniform noise. Queries: ``--queries`` data
rows plus small noise (a different seed from build-time tuning). Both
indexes use inner product (cosine).

- ``flat``: ``IndexFlatIP`` via ``build_index(kind="flat")``; its results are the exact top-10.
- ``approx``: ``build_index(kind="auto")`` with ``choose_kind`` forced past flat (N >= 50k) and
  nprobe/efSearch auto-tuned to ``target_recall`` on held-out queries.

Prints ONE JSON line: build seconds and queries/s of each, the approximate index's kind and
settings, ``recall_at_10`` (vs flat) and ``speedup_vs_exact`` (targets: >= 0.95 and >= 20).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from vlmray.retrieval.index import IndexConfig, build_index, recall_at_k  # noqa: E402


def clustered(n: int, dim: int, clusters: int, noise_norm: float, seed: int = 0) -> np.ndarray:
    """``(n, dim)`` float32, unit norm, around ``clusters`` centres; built in 100k chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32) * (noise_norm / np.sqrt(dim))
        out[lo:hi] = centres[rng.integers(0, clusters, hi - lo)] + noise
    faiss.normalize_L2(out)
    return out


def timed_search(built, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    """``(ids (Q, k), queries/s)`` of one batch search."""
    t0 = time.perf_counter()
    _, ids = built.index.search(queries, k)
    return ids, len(queries) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm")
    p.add_argument("--memory-budget-mb", type=float, default=4096)
    args = p.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%X')}] {msg}", file=sys.stderr, flush=True)

    log(f"generating {args.n} x {args.dim}")
    x = clustered(args.n, args.dim, args.clusters, args.noise)
    keys = np.char.mod("%09d", np.arange(args.n)).astype(object)
    rng = np.random.default_rng(123)
    queries = x[rng.choice(args.n, args.queries, replace=False)]
    noise = rng.standard_normal(queries.shape, dtype=np.float32) * (0.05 / np.sqrt(args.dim))
    queries = (queries + noise).astype(np.float32)
    faiss.normalize_L2(queries)

    log("flat")
    flat = build_index(x, keys, IndexConfig(kind="flat"), queries_holdout=0)
    exact, flat_qps = timed_search(flat, queries)
    flat_build = flat.report["build_s"]
    del flat
    log("approx")
    approx = build_index(x, keys, IndexConfig(memory_budget_mb=args.memory_budget_mb))
    ids, approx_qps = timed_search(approx, queries)
    report = approx.report
    result = {
        "benchmark": "faiss_index", "n": args.n, "dim": args.dim, "queries": args.queries,
        "clusters": args.clusters, "noise": args.noise, "threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(), "gpus": faiss.get_num_gpus(),
        "flat": {"build_s": flat_build, "qps": round(flat_qps, 1)},
        "approx": {k: report[k] for k in ("kind", "nlist", "nprobe", "efSearch", "pq_m", "bytes",
                                          "recall_at_10") if k in report}
        | {"build_s": report["build_s"], "qps": round(approx_qps, 1),
           "tuned_recall_at_10": report["recall_at_10"]},
        "recall_at_10": round(recall_at_k(ids, exact), 4),
        "speedup_vs_exact": round(approx_qps / flat_qps, 1),
    }
    del result["approx"]["recall_at_10"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
