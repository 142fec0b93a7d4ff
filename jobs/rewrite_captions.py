"""Rewrite captions with an LLM (La-CLIP) and/or caption images (ALIP) on Ray Data; write
shards whose JSON sidecars carry ``texts_aug`` (the original then k rewrites),
``rewrite_fallbacks`` (why a rewrite fell back to the original), and optionally
``synthetic_caption`` / ``caption_fallback``, plus stats.json.

    python jobs/rewrite_captions.py --output /tmp/rewritten                 # built-in, offline
    python jobs/rewrite_captions.py --output out --rewrite.backend transformers \\
        --rewrite.model smollm2 --rewrite.k 2 --rewrite.sampling.temperature 0
    python jobs/rewrite_captions.py --input s3://curated/v1 --output s3://rewritten/v1 \\
        --rewrite.backend vllm --rewrite.model /models/llama --rewrite.num_gpus 1
    ray job submit --working-dir . -- python jobs/rewrite_captions.py --output ...

Every input row is written, in input order (rows_in == rows_out is checked); train from the
result with ``--data.source <output>`` (it has shards/ and eval/).
"""

from __future__ import annotations

import json
import sys

from vlmray.cli import parse_job_config, run_job
from vlmray.config.jobs import RewriteJobConfig


def parse(argv: list[str] | None) -> RewriteJobConfig:
    return parse_job_config(argv, RewriteJobConfig(), description=__doc__, group="settings")


def _line(name: str, tally: dict) -> str:
    return (f"{name}: {tally['kept']} kept, {tally['fell_back']} fell back "
            f"{tally['by_reason']}")


def main(argv: list[str] | None = None) -> int:
    job = parse(argv)
    from vlmray.pipelines.rewrite import run

    stats = run_job(run, job)
    parts = [_line("rewrites", stats["rewrites"])]
    if stats["captioner"] != "none":
        parts.append(_line("captions", stats["captions"]))
    print(f"[rewrite] {stats['rows_in']} rows in -> {stats['rows_out']} out, k={stats['k']} "
          f"({stats['backend']}); {'; '.join(parts)}; {stats['captions_per_s']} captions/s, "
          f"{stats['output_tokens_per_s']} tokens/s -> {job.output}")
    for ex in stats["examples"][:3]:
        print(f"[rewrite]   {ex['text']!r} -> {json.dumps(ex['texts_aug'][1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
