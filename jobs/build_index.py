"""Embed image-text pairs on Ray Data and build a FAISS index per modality, auto-tuned to a
target recall@10 (trained once, filled in parallel Ray tasks, merged).

    python jobs/build_index.py --output /tmp/index --embed.model runs/clip     # built-in data
    python jobs/build_index.py --input s3://curated/v1 --output s3://index/v1 \\
        --embed.model s3://runs/clip --embed.actors 4 --embed.num_gpus 1 --index.kind ivf_flat
    python jobs/build_index.py --output out --embed.model minilm --embed.modality text
    ray job submit --working-dir . -- python jobs/build_index.py --input s3://cur --output ...

Writes <output>/embeddings/, rejects/, index/{image,text}/ and stats.json; every input row is
embedded, rejected with a reason, or outside the chosen --subset, and the job checks it.
"""

from __future__ import annotations

import sys

from vlmray.cli import parse_job_config, run_job
from vlmray.config.jobs import IndexJobConfig


def parse(argv: list[str] | None) -> IndexJobConfig:
    return parse_job_config(argv, IndexJobConfig(), description=__doc__, group="settings")


def main(argv: list[str] | None = None) -> int:
    job = parse(argv)
    from vlmray.pipelines.index import run

    stats = run_job(run, job)
    print(f"[build_index] {stats['rows_in']} rows in -> {stats['rows_embedded']} embedded "
          f"+ {stats['rows_rejected']} rejected {stats['reject_reasons']} "
          f"+ {stats['rows_outside_subset']} outside subset, in {stats['wall_s']}s")
    for name, r in stats["indexes"].items():
        knob = "".join(f" {k}={r[k]}" for k in ("nlist", "nprobe", "efSearch") if k in r)
        print(f"[build_index] {name:<5} {r['kind']:<8} n={r['n']} dim={r['dim']}{knob} "
              f"recall@10={r['recall_at_10']:.3f} build={r['build_s']}s bytes={r['bytes']} "
              f"-> {r['uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
