"""Pretrain a vision-language model on Ray; the default trains a small CLIP on built-in data.

    python jobs/pretrain.py                                   # local Ray, CPU, clip_tiny
    python jobs/pretrain.py --recipe clip_tiny --train.steps 200 --output runs/a
    ray job submit --working-dir . -- python jobs/pretrain.py --train.steps 100
"""

from __future__ import annotations

import json
import sys

from vlmray.api import run
from vlmray.cli import fail, parse_config
from vlmray.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_config(argv, __doc__)
    try:
        result = run(cfg, args.output, resume=args.resume)   # validates before any Ray work
    except ConfigError as e:
        fail(str(e))
    m = result.metrics
    print(f"[vlmray] done in {m['wall_s']:.0f}s  run dir: {result.run_dir}")
    if m.get("zero_shot_top1") is not None:
        print(f"[vlmray] zero-shot top-1 {m['zero_shot_top1']:.3f} (chance {m['zero_shot_chance']:.3f})"
              f"  top-5 {m['zero_shot_top5']:.3f}")
        print(f"[vlmray] retrieval R@1 i2t {m['retrieval_i2t_r1']:.3f}  t2i {m['retrieval_t2i_r1']:.3f}"
              f"  R@5 i2t {m['retrieval_i2t_r5']:.3f}  t2i {m['retrieval_t2i_r5']:.3f}")
    print(f"[vlmray] rows in {m['rows_in']}, rejected {m['rows_rejected']} {m['reject_reasons']}")
    print(json.dumps({k: v for k, v in m.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
