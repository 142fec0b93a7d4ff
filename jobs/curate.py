"""Curate noisy image-text pairs on Ray Data: read -> [download] -> text -> image -> [score]
-> dedup -> [keep top fraction] -> fixed-size shards + rejects/ (a reason per row) + stats.json.

    python jobs/curate.py --output /tmp/curated                  # built-in noisy data
    python jobs/curate.py --input s3://raw/shards --output s3://curated/v1 --write.format parquet
    python jobs/curate.py --input urls.parquet --output out --download.per_host 8
    ray job submit --working-dir . -- python jobs/curate.py --input s3://raw --output s3://cur

Every input row ends in the shards or in rejects/ with a reason; the job checks
rows_in == rows_out + rows_rejected and fails loudly if not. Re-running the same command after
an interruption reuses finished work and skips shards already written.
"""

from __future__ import annotations

import json
import sys

from vlmray.cli import parse_job_config, run_job
from vlmray.config.jobs import CurateJobConfig


def parse(argv: list[str] | None) -> CurateJobConfig:
    return parse_job_config(argv, CurateJobConfig(), description=__doc__,
                            group="settings (stage groups in plan order)")


def main(argv: list[str] | None = None) -> int:
    job = parse(argv)
    from vlmray.pipelines.curate import run

    stats = run_job(run, job).stats
    print(f"[curate] {stats['rows_in']} rows in -> {stats['rows_out']} out "
          f"+ {stats['rows_rejected']} rejected, {stats['shards']} shards in {job.output}")
    for st in stats["stages"]:
        print(f"[curate]   {st['name']:<20} in {st['in']:>8}  kept {st['kept']:>8}  "
              f"dropped {st['dropped']}  repaired {st['repaired']}")
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
