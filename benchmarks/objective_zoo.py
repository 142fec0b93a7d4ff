"""Objective zoo: every contrastive recipe trained for the same budget on the same noisy rows.

    python benchmarks/objective_zoo.py                          # every *_tiny recipe, 300 steps
    python benchmarks/objective_zoo.py --recipes clip_tiny,siglip_tiny --steps 20 \\
        --num-train 800 --output /tmp/zoo_smoke

The built-in data (``--num-train`` train rows, ``--mismatch`` of them with a swapped caption,
the generator's other noise at its defaults, a clean 1000-row eval split) is generated ONCE into
``<output>/data`` and every recipe reads it as ``data.source``, so all train on identical rows.
Every recipe gets the same overrides: ``train.steps``, ``train.seed``, ``eval.every = steps``
(one evaluation, at the end), ``data.synthetic.*`` (recorded only: the data is shared) and
``--batch-size`` when given; everything else is the recipe's own (towers, lr, warmup, image size).
The retrieval recipes spend extra work outside that budget, listed in the table's notes:
raclip_tiny first trains its bootstrap CLIP embedder for the recipe's ``bootstrap_steps`` on a
20% reference split and then trains on the other 80% only; declip_nns_tiny embeds every caption
with the pretrained MiniLM sentence encoder to find its neighbours.

Each recipe is one ``jobs/pretrain.py`` subprocess (the driver) against its own fresh,
loopback-only Ray head (free ports, private temp dir, own session; torn down after the recipe),
so no memory, worker or object store carries over from one recipe to the next.

Memory is measured, not estimated: a thread reads ``/proc/<pid>/status`` every 0.2 s for every
process of the head's session (GCS, raylet, Ray Data and Ray Train workers) plus the driver.
``peak_worker_mb`` (the table's "peak MB") is the kernel's high-water mark ``VmHWM`` of the
Ray Train worker process (cmdline ``ray::RayTrainWorker...``; raclip's bootstrap run has its own,
the larger counts); growth in a worker's last 0.2 s of life would be missed. ``peak_tree_mb`` is
the largest sampled sum of ``VmRSS`` over all those processes (shared library pages count once
per process, so it over-states the machine's use).

Read the table against chance (1/20 classes) and against clip_tiny: ``delta_vs_clip`` is the
recipe's figure minus clip_tiny's (absolute, in top-1 / R@1 points). Short budgets favour
objectives that converge fast; a difference within a few points is noise (try two ``--seed``s).
Writes ``<output>/zoo.json``, ``zoo.md``, ``zoo.png``; prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from train_throughput import _session_pids, local_head  # sibling script

from vlmray.data.synthetic import write_synthetic
from vlmray.recipes import list_recipes, recipe

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("zero_shot_top1", "zero_shot_chance", "retrieval_i2t_r1", "retrieval_t2i_r1",
          "samples_per_s", "wall_s", "final_loss", "steps", "rows_in", "rows_rejected")
TASK_FIELDS = ("caption_bleu4_greedy", "caption_bleu4_beam", "caption_f1_greedy",
               "pali_bleu4_greedy", "pali_bleu4_beam", "pali_f1_greedy", "itm_accuracy",
               "itm_auc", "grounding_top1", "seg_miou", "seg_miou_fg", "seg_pixel_acc",
               "seg_miou_all_background", "mim_mse", "completion_bleu4_greedy",
               "completion_f1_greedy")
"""Held-out figures that only some recipes measure (their objectives' or model's own
evaluation: generated-caption overlap, ITM, grounding, segmentation)."""
BASELINE = "clip_tiny"


class MemoryProbe(threading.Thread):
    """Samples ``/proc`` for the Ray head's session ``sid`` plus ``extra`` pids every
    ``interval`` s: VmHWM per Ray Train worker, and the peak of the summed VmRSS."""

    def __init__(self, sid: int, extra: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.sid, self.extra, self.interval = sid, extra, interval
        self.worker_hwm_kb: dict[int, int] = {}
        self.tree_peak_kb = 0
        self._stop_event = threading.Event()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def sample(self) -> None:
        total = 0
        for pid in set(_session_pids(self.sid)) | {self.extra}:
            with contextlib.suppress(OSError, ValueError):
                status = self._status(pid)
                total += status.get("VmRSS", 0)
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    hwm = max(status.get("VmHWM", 0), self.worker_hwm_kb.get(pid, 0))
                    self.worker_hwm_kb[pid] = hwm
        self.tree_peak_kb = max(self.tree_peak_kb, total)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(r for r in list_recipes() if r.endswith("_tiny")),
                   help="comma list (default: every registered *_tiny recipe)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps for every recipe")
    p.add_argument("--mismatch", type=float, default=0.4, help="train fraction, caption swapped")
    p.add_argument("--num-train", type=int, default=8000, help="train rows generated")
    p.add_argument("--seed", type=int, default=0, help="data generator seed and train.seed")
    p.add_argument("--batch-size", type=int, default=0, help="global batch (0: the recipe's)")
    p.add_argument("--output", default="runs/zoo")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per recipe before it fails")
    return p.parse_args(argv)


def prepare_data(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Generates the shared dataset into ``root`` once; an existing one must match the flags."""
    syn = replace(recipe(BASELINE).data.synthetic, seed=args.seed, num_train=args.num_train,
                  mismatch_frac=args.mismatch)
    manifest = root / "dataset.json"
    if manifest.exists():
        if json.loads(manifest.read_text())["config"] != asdict(syn):
            raise SystemExit(f"{root} holds data generated with other settings; pick another "
                             "--output")
        return asdict(syn)
    write_synthetic(syn, str(root), workers=os.cpu_count() or 1)
    return asdict(syn)


def overrides(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """The dotted overrides every recipe gets (the equal budget)."""
    o: dict[str, Any] = {"data.source": str(data_dir), "train.steps": args.steps,
                         "train.seed": args.seed, "eval.every": args.steps,
                         "data.synthetic.seed": args.seed,
                         "data.synthetic.num_train": args.num_train,
                         "data.synthetic.mismatch_frac": args.mismatch}
    if args.batch_size:
        o["train.batch_size"] = args.batch_size
    return o


def same_noise_sources(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """For a recipe with extra built-in sources (zerovl_tiny), those sources generated at the
    zoo's mismatch rate too, so no recipe gets cleaner data than the others."""
    extra = recipe(name).data.extra_sources
    if not extra:
        return {}
    fair = []
    for spec in extra:
        if spec.startswith("builtin"):
            head, _, query = spec.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if p)
            params["mismatch_frac"] = str(args.mismatch)
            spec = head + "?" + "&".join(f"{k}={v}" for k, v in params.items())
        fair.append(spec)
    return {"data.extra_sources": json.dumps(fair)}


def describe(name: str, o: dict[str, Any]) -> dict[str, Any]:
    """Objectives, batch size and what the recipe spends beyond the shared budget."""
    cfg = recipe(name, **{k: str(v) for k, v in o.items()})
    objectives = " + ".join(s.name if s.weight == 1 else f"{s.weight:g} {s.name}"
                            for s in cfg.objectives)
    r, notes = cfg.data.retrieval, []
    if r.attach == "references":
        notes.append(f"+{r.bootstrap_steps} bootstrap CLIP steps (recipe's, not scaled) on a "
                     f"{r.reference_fraction:.0%} reference split; trains on the rest; "
                     f"k={r.k} references")
    elif r.attach == "neighbour_text":
        notes.append(f"neighbour captions from a FAISS index of {r.resolved_embedder} "
                     "(pretrained) caption embeddings")
    if cfg.data.image_size != recipe(BASELINE).data.image_size:
        notes.append(f"{cfg.model.vision} at {cfg.data.image_size} px")
    if cfg.data.cache:
        notes.append("rows cached in memory (data.cache)")
    if cfg.model.arch != "dual_encoder":
        notes.append(f"model.arch={cfg.model.arch}")
    if cfg.data.extra_sources:
        notes.append(f"+ extra sources {', '.join(cfg.data.extra_sources)} "
                     f"({cfg.data.sampling} sampling)")
    v, rw = cfg.data.views, cfg.data.rewrite
    kinds = [*v.image, *v.text] + (["mlm"] if v.mlm_prob else []) + (
        ["rendered text"] if v.render_text else [])
    if kinds:
        notes.append("views: " + ", ".join(kinds))
    if rw.k:
        notes.append(f"{rw.k} {rw.backend} rewrites per caption, caption sampled "
                     f"{v.caption_sampling}")
    if rw.captioner != "none":
        notes.append(f"{rw.captioner} synthetic captions")
    return {"objectives": objectives, "batch_size": cfg.train.batch_size,
            "notes": "; ".join(notes)}


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def _error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Error" in ln or ln.startswith("error:")]
    return ((hits or lines or ["no output"])[-1])[:300]


def run_recipe(name: str, o: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
    """One recipe: a fresh Ray head, ``jobs/pretrain.py`` as the driver, memory sampled."""
    run_dir, log = out / "runs" / name, out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--recipe", name,
           "--output", str(run_dir)] + [a for k, v in o.items() for a in (f"--{k}", str(v))]
    t0, row = time.perf_counter(), {"recipe": name, **describe(name, o)}
    with local_head(num_cpus=os.cpu_count() or 1, log=log) as (address, sid):
        env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        probe = MemoryProbe(sid, proc.pid)
        probe.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            row["error"] = f"timed out after {timeout:.0f} s"
        finally:
            probe.stop()
    hwm = probe.worker_hwm_kb
    row.update(proc_wall_s=round(time.perf_counter() - t0, 1), train_workers_seen=len(hwm),
               peak_worker_mb=round(max(hwm.values()) / 1024, 1) if hwm else None,
               peak_tree_mb=round(probe.tree_peak_kb / 1024, 1))
    metrics = run_dir / "metrics.json"
    if rc == 0 and metrics.exists():
        m = json.loads(metrics.read_text())
        row.update(status="ok", **{k: _round(m.get(k)) for k in FIELDS})
        row["task_metrics"] = task_metrics(run_dir, m)
    else:
        row.update(status="failed", error=row.get("error") or f"rc={rc}: {_error(log)}")
    return row


def task_metrics(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """TASK_FIELDS from the run's summary, else from the last evaluated row of its history
    (summaries written before they carried the objectives' own figures)."""
    found = {k: summary[k] for k in TASK_FIELDS if summary.get(k) is not None}
    history = run_dir / "history.jsonl"
    if not found and history.exists():
        rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(rows) if "zero_shot_top1" in r), {})
        found = {k: last[k] for k in TASK_FIELDS if last.get(k) is not None}
    return {k: _round(v) for k, v in found.items()}


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """``delta_vs_clip``: each quality figure minus clip_tiny's (None without a clip_tiny)."""
    base = next((r for r in rows if r["recipe"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["delta_vs_clip"] = None if base is None or r["status"] != "ok" else {
            k: round(r[k] - base[k], 4) for k in ("zero_shot_top1", "retrieval_i2t_r1",
                                                  "retrieval_t2i_r1")
            if r.get(k) is not None and base.get(k) is not None}


def _fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_markdown(path: Path, fig: dict[str, Any]) -> None:
    head = ("| recipe | objectives | zero-shot top-1 | Δ vs clip | R@1 i2t | R@1 t2i | samples/s "
            "| peak MB (train worker) | wall s | task metrics | notes |")
    lines = [f"Objective zoo: {fig['steps']} steps, batch {fig['batch_size'] or 'per recipe'}, "
             f"{fig['num_train']} train rows, mismatch {fig['mismatch']}, seed {fig['seed']}; "
             f"chance {_fmt(fig['chance'])}.", "", head, "|" + " --- |" * 11]
    for r in fig["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['recipe']} | {r['objectives']} | **failed** | | | | | "
                         f"{_fmt(r['peak_worker_mb'], 0)} | {_fmt(r['proc_wall_s'], 0)} | | "
                         f"{r['error'].replace('|', '/')} |")
            continue
        delta = (r["delta_vs_clip"] or {}).get("zero_shot_top1")
        lines.append(f"| {r['recipe']} | {r['objectives']} | {_fmt(r['zero_shot_top1'])} | "
                     f"{'–' if delta is None else f'{delta:+.3f}'} | "
                     f"{_fmt(r['retrieval_i2t_r1'])} | {_fmt(r['retrieval_t2i_r1'])} | "
                     f"{_fmt(r['samples_per_s'], 1)} | {_fmt(r['peak_worker_mb'], 0)} | "
                     f"{_fmt(r['wall_s'], 0)} | {_task(r)} | {r['notes']} |")
    path.write_text("\n".join(lines) + "\n")


def _task(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("task_metrics") or {}).items())


def plot(path: Path, fig: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = fig["results"]
    names = [r["recipe"] for r in rows]
    top1 = [r.get("zero_shot_top1") or 0.0 for r in rows]
    f, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    bars = ax.bar(names, top1, color=["tab:gray" if r["status"] != "ok" else
                                      "tab:blue" if r["recipe"] == BASELINE else "tab:orange"
                                      for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate("failed" if r["status"] != "ok" else f"{r['zero_shot_top1']:.3f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if fig["chance"]:
        ax.axhline(fig["chance"], color="red", linestyle="--", label=f"chance {fig['chance']:.3f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 1.15 * max(top1 + [fig["chance"] or 0.0, 0.01]))
    ax.set_ylabel("zero-shot top-1 (held-out)")
    ax.set_title(f"{fig['steps']} steps, mismatch {fig['mismatch']}, {fig['num_train']} rows")
    ax.tick_params(axis="x", rotation=30)
    f.tight_layout()
    f.savefig(path, dpi=120)
    plt.close(f)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(list_recipes()))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; valid: {list_recipes()}")
    out = Path(args.output).resolve()
    synthetic = prepare_data(args, out / "data")
    o = overrides(args, out / "data")
    rows = []
    for name in names:
        print(f"[zoo] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_recipe(name, {**o, **same_noise_sources(name, args)}, out, args.timeout))
        print(f"[zoo] {name}: {rows[-1]['status']} {rows[-1].get('zero_shot_top1')}",
              file=sys.stderr, flush=True)
    add_deltas(rows)
    chance = next((r["zero_shot_chance"] for r in rows if r.get("zero_shot_chance")), None)
    fig = {"bench": "objective_zoo", "steps": args.steps, "mismatch": args.mismatch,
           "num_train": args.num_train, "seed": args.seed, "batch_size": args.batch_size or None,
           "chance": chance, "baseline": BASELINE, "cores": os.cpu_count(),
           "overrides": o, "synthetic": synthetic, "results": rows}
    (out / "zoo.json").write_text(json.dumps(fig, indent=1))
    write_markdown(out / "zoo.md", fig)
    plot(out / "zoo.png", fig)
    print(json.dumps(fig))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
