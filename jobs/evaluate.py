"""Evaluate a checkpoint on a held-out split: zero-shot top-1/top-5 and retrieval R@1/5/10.

    python jobs/evaluate.py runs/a/ray/train/checkpoint_XXXX            # its run's held-out split
    python jobs/evaluate.py s3://bucket/runs/a                          # a run's newest intact one
    python jobs/evaluate.py CHECKPOINT --eval-source s3://bucket/ds/eval --max-samples 500

Checkpoints and runs are local paths or URIs; a checkpoint is checked against its manifest and
read with weights_only=True (see vlmray/train/checkpoint.py) before anything is evaluated.
A held-out split is any shape vlmray/eval/sources.py accepts (shards with classes.json,
classnames.json or classnames.txt, or an ImageNet-style <class>/<image> folder); a run without
one, or a split that is missing or malformed, is explained and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vlmray.config import Config
from vlmray.config.sources import is_builtin
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.storage import exists
from vlmray.eval import evaluate, load_heldout
from vlmray.eval.sources import ACCEPTED_SHAPES, EvalSourceError
from vlmray.train.checkpoint import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    read_config,
)
from vlmray.train.state import build_core_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a checkpoint directory, or a run directory (latest is used)")
    p.add_argument("--eval-source", default="", help="held-out split (default: the run's own)")
    p.add_argument("--max-samples", type=int, default=0, help="rows to use (default: config's)")
    args = p.parse_args(argv)
    ckpt = find_latest(args.checkpoint)
    if ckpt is None:
        p.error(f"no intact checkpoint under {args.checkpoint!r}")
    cfg = Config.from_dict(read_config(ckpt))
    model = build_core_model(cfg)
    try:
        progress = load_checkpoint(ckpt, model=model)
    except CheckpointError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    eval_uri = args.eval_source or _run_eval_uri(cfg, str(ckpt))
    if not eval_uri:
        print(f"evaluate: the run of {str(ckpt)!r} has no held-out split (data.eval_source is "
              f"unset and {cfg.data.source!r} has no eval/ folder; its metrics.json says "
              f"\"eval\": \"none\"): pass --eval-source <dir>; {ACCEPTED_SHAPES}",
              file=sys.stderr)
        return 2
    tok = tokenizer_for(cfg.data)
    try:
        data = load_heldout(eval_uri, decode_spec(cfg.data), tok,
                            max_samples=args.max_samples or cfg.eval.max_samples)
    except EvalSourceError as e:
        where = "--eval-source" if args.eval_source else "the run's held-out split"
        print(f"evaluate: cannot evaluate on {where}: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        metrics = evaluate(model, data, tok, batch_size=cfg.eval.batch_size)
    print(json.dumps({"checkpoint": str(ckpt), "step": progress.step, "eval_rows": len(data),
                      **metrics}))
    return 0


def _run_eval_uri(cfg: Config, ckpt: str) -> str:
    """The held-out split a run trained against: the config's ``data.eval_source``, its own
    built-in data's, or its source's ``eval/`` folder; "" when that source has none (as
    ``vlmray.api.resolve_data`` decides)."""
    if cfg.data.eval_source:
        return cfg.data.eval_source
    if not is_builtin(cfg.data.source):
        uri = f"{cfg.data.source.rstrip('/')}/eval"
        return uri if exists(uri) else ""
    run_dir = ckpt.split("/ray/")[0]
    return f"{run_dir}/data/eval"


if __name__ == "__main__":
    sys.exit(main())
