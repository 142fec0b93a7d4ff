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

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `pipelines`

from vlmray.cli import add_field_flags, fail  # noqa: E402
from vlmray.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    field_paths,
    unknown_field_message,
)
from vlmray.data.curation.config import CurateJobConfig  # noqa: E402


def parse(argv: list[str] | None) -> CurateJobConfig:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_flags(parser.add_argument_group("settings (stage groups in plan order)"),
                    CurateJobConfig(), show_defaults=True)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        parser.error(unknown_field_message(flag, sorted(field_paths(CurateJobConfig()))))
    try:
        return apply_overrides(CurateJobConfig(), vars(args))
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
        raise


def main(argv: list[str] | None = None) -> int:
    job = parse(argv)
    from pipelines.curate import run

    try:
        stats = run(job).stats
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(f"[curate] {stats['rows_in']} rows in -> {stats['rows_out']} out "
          f"+ {stats['rows_rejected']} rejected, {stats['shards']} shards in {job.output}")
    for st in stats["stages"]:
        print(f"[curate]   {st['name']:<20} in {st['in']:>8}  kept {st['kept']:>8}  "
              f"dropped {st['dropped']}  repaired {st['repaired']}")
    print(json.dumps({k: v for k, v in stats.items() if not isinstance(v, (dict, list))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
