"""Generated captions for the first held-out images, from a trained run's checkpoint.

    python benchmarks/caption_examples.py runs/zoo/runs/coca_tiny --n 5

Loads the run's config and latest checkpoint (model and objectives), reads the held-out split
the run evaluated on, and prints ONE JSON line: for each image its key, the paired caption and
the greedy and beam captions of every captioning objective in the run (``caption``, ``pali``,
``nlip_completion``), as words.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlmray.api import resolve_data
from vlmray.config import Config
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.eval import load_heldout
from vlmray.eval.captioning import caption_examples
from vlmray.train.checkpoint import find_latest, load_checkpoint, read_config
from vlmray.train.state import build_state

CAPTIONERS = ("caption", "pali", "nlip_completion")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's output directory (holds config.json and ray/)")
    p.add_argument("--n", type=int, default=5, help="held-out images")
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    ckpt = find_latest(run)
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint found")
    cfg = Config.from_dict(read_config(ckpt))
    state = build_state(cfg, device=torch.device("cpu"))
    progress = load_checkpoint(ckpt, model=state.core, objectives=state.mix)
    tok = tokenizer_for(cfg.data)
    _, eval_uri = resolve_data(cfg, str(run))      # the split the run evaluated on
    if not eval_uri:
        raise SystemExit(f"{run}: its data source has no held-out split")
    # more rows than shown: their captions are the words generated ids are mapped back to
    data = load_heldout(eval_uri, decode_spec(cfg.data), tok, max_samples=max(args.n, 1000))
    found = [n for n in CAPTIONERS if n in state.mix.objectives]
    if not found:
        raise SystemExit(f"{run}: no captioning objective among {list(state.mix.objectives)}")
    out = {"bench": "caption_examples", "run": str(run), "step": progress.step,
           "examples": {n: caption_examples(state.mix.objectives[n], state.core, data, tok,
                                            n=args.n, beam_size=args.beam_size)
                        for n in found}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
