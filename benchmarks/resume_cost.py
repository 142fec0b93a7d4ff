"""Resume cost: time from a restart to the first trained step, with the checkpoint at 5% and at
90% of an epoch, for this code and for a baseline revision (issue 17, item 7).

    python benchmarks/resume_cost.py                       # N = 16384 rows, baseline adfa4fb
    python benchmarks/resume_cost.py --rows 4096 --ref HEAD --baseline-ref HEAD~20

The built-in generator writes N noise-free train rows (``--gen-image-size`` px JPEGs, default
384: web-sized images, whose decode is what a re-read costs; decoded to ``--image-size``, 64, so
the tiny model's step stays cheap; cached under ``--work-dir``/data by N and size). For each
code (this checkout, or the commit ``--ref`` names, and the baseline revision, each checked out
once as a git worktree under ``--work-dir``) and each position p (5% and 90% of an epoch of
``N / batch`` steps, one worker):

1. a child process trains clip_tiny's recipe (its tiny model, CPU, no curation prefix) for p
   steps and checkpoints at the end (``train.steps = p``; it logs once, at its end);
2. ``--repeats`` times, a fresh child process (a new driver and a new local Ray, as after a
   preemption) resumes a fresh copy of that run (``--resume``, ``train.steps = p + 2``,
   ``train.log_every = 1``). The clock starts once its Ray is up (Ray's own start, the same for
   both codes, is left out) and stops at step p + 1's row in ``history.jsonl``: planning the
   feed, starting Ray Train, building the model, restoring the checkpoint, reaching the resume
   position in the data, and the step.

Today's code (the baseline) re-reads and decodes every batch of the epoch up to the checkpoint
and throws it away; the exact order seeks: the 90% restart should cost about what the 5% one
does (target: <= 1.2x). Prints ONE JSON line (and appends it to ``<output>/resume_cost.jsonl``):
per code, the median ``restart_to_step_s`` of ``--repeats`` restarts at each position (each
sample also gives ``workers_start_s``: the driver's part, before Ray Train's workers start),
their ratio, and ``met``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REF = "adfa4fb"
"""The last commit before the exact epoch order (skip-and-discard resume)."""

CHILD = r"""
import json, os, sys, time, tempfile, shutil
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["code"])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
ray.init(num_cpus=spec["cpus"], include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
import vlmray
from vlmray.train.history import read_events, read_history
cfg = vlmray.recipe("clip_tiny", **spec["overrides"])
t0 = time.time()
vlmray.run(cfg, output=spec["run"], resume=spec["resume"])
wall = time.time() - t0
rows = [r for r in read_history(spec["run"]) if r["step"] > spec["after"]]
first = min(rows, key=lambda r: r["step"])
start = [e for e in read_events(spec["run"]) if e["event"] == "start"][-1]
print("RESULT " + json.dumps({"restart_to_step_s": first["time"] - t0, "wall_s": wall,
                              "workers_start_s": start["time"] - t0,
                              "first_step": first["step"], "code": vlmray.__file__}), flush=True)
ray.shutdown()
shutil.rmtree(tmp, ignore_errors=True)
"""


def _data(work: Path, rows: int, gen_size: int) -> Path:
    out = work / "data" / f"n{rows}-s{gen_size}"
    if (out / "_DONE").exists():
        return out
    sys.path.insert(0, str(ROOT))
    from vlmray.config.data import SyntheticConfig
    from vlmray.data.synthetic import write_synthetic

    cfg = SyntheticConfig(num_train=rows, num_eval=256, image_size=gen_size, shard_size=1024,
                          mismatch_frac=0.0, junk_frac=0.0, near_dup_frac=0.0,
                          corrupt_frac=0.0, overlong_frac=0.0)
    write_synthetic(cfg, str(out), workers=2)
    (out / "_DONE").write_text("ok")
    return out


def _worktree(work: Path, ref: str) -> Path:
    """A checkout of ``ref`` (a commit, resolved once) under ``work``."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], check=True,
                            capture_output=True, text=True).stdout.strip()
    tree = work / f"tree-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                       check=True, capture_output=True)
    return tree


def _child(code: Path, run: Path, overrides: dict[str, Any], *, resume: bool, after: int,
           cpus: int) -> dict[str, Any]:
    spec = {"code": str(code), "run": str(run), "overrides": overrides, "resume": resume,
            "after": after, "cpus": cpus}
    env = {**os.environ, "RAY_TMPDIR": str(run.parent / "raytmp"), "TMPDIR": str(run.parent),
           "PYTHONPATH": str(code)}   # the driver and every Ray worker import this code
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=str(code),
                          env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def measure(code: Path, data: Path, out: Path, position: int,
            args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--repeats`` restarts from a checkpoint at ``position`` (trained there once; each
    restart from a fresh copy of that run): seconds from a fresh driver's resume call to the
    first step after it, and to the workers' start (the driver's planning before it)."""
    run = out / f"run-{position}"
    base = {"data.source": str(data), "data.image_size": args.image_size,
            "train.batch_size": args.batch, "train.num_workers": 1, "data.curate": False,
            "train.checkpoint_every": 0, "eval.every": 0, "eval.max_samples": 64}
    _child(code, run, {**base, "train.steps": position, "train.log_every": position},
           resume=False, after=0, cpus=args.cpus)
    samples = []
    for r in range(args.repeats):
        again = out / f"run-{position}-restart-{r}"
        shutil.copytree(run, again)
        got = _child(code, again, {**base, "train.steps": position + 2, "train.log_every": 1},
                     resume=True, after=position, cpus=args.cpus)
        if not got["code"].startswith(str(code)):
            raise RuntimeError(f"the child imported {got['code']}, not the code under {code}")
        if got["first_step"] != position + 1:
            raise RuntimeError(f"resumed at step {got['first_step']}, expected {position + 1}")
        samples.append(got)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--gen-image-size", type=int, default=384,
                   help="side of the stored JPEGs: what a re-read must decode")
    p.add_argument("--repeats", type=int, default=3, help="restarts per position (median)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--baseline-ref", default=BASELINE_REF)
    p.add_argument("--ref", default="", help="measure this commit (a worktree) instead of the "
                   "working tree (which other work may be changing)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "vlmray-resume"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "resume"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = _data(work, args.rows, args.gen_image_size)
    epoch_steps = args.rows // args.batch
    positions = {"5%": max(1, round(0.05 * epoch_steps)), "90%": round(0.9 * epoch_steps)}
    codes = {"exact_order": _worktree(work, args.ref) if args.ref else ROOT,
             "baseline": _worktree(work, args.baseline_ref)}
    result: dict[str, Any] = {"rows": args.rows, "batch": args.batch, "workers": 1,
                              "epoch_steps": epoch_steps, "positions": positions,
                              "baseline_ref": args.baseline_ref, "ref": args.ref or "worktree",
                              "cpus": args.cpus}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, code in codes.items():
        times, samples = {}, {}
        for label, position in positions.items():
            out = work / "runs" / f"{stamp}-{name}"
            got = measure(code, data, out, position, args)
            times[label] = round(statistics.median(g["restart_to_step_s"] for g in got), 2)
            samples[label] = [{k: round(g[k], 2) for k in ("restart_to_step_s",
                                                           "workers_start_s")} for g in got]
        ratio = times["90%"] / times["5%"]
        result[name] = {"restart_to_step_s": times, "ratio_90_over_5": round(ratio, 3),
                        "met": ratio <= 1.2, "samples": samples}
    result["excludes"] = ("the restarted driver's own Ray start (the same for both codes); "
                          "the training before the checkpoint")
    line = json.dumps(result)
    print(line)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with open(Path(args.output) / "resume_cost.jsonl", "a") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
