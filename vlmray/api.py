"""The Python API: one call runs data preparation, ingest, training and evaluation.

    import vlmray
    cfg = vlmray.recipe("clip_tiny", **{"train.steps": 100})
    result = vlmray.run(cfg, output="runs/demo")
    print(result.metrics["zero_shot_top1"], result.checkpoint)
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmray.config import Config, ConfigError, validate
from vlmray.data.storage import filesystem, join


@dataclass
class RunResult:
    run_dir: str
    metrics: dict[str, Any]
    checkpoint: str | None


def init_ray() -> None:
    """Connects to the cluster a job was submitted to (RAY_ADDRESS), or starts a local one
    bound to loopback. Ray Data's per-operator progress bars are turned off: the run prints its
    own ingest summary and per-step progress."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(dashboard_host="127.0.0.1")


def resolve_data(cfg: Config, run_dir: str) -> tuple[str, str]:
    """Returns (train shards URI, held-out URI or ""), generating the built-in data if asked."""
    if cfg.data.source == "builtin":
        from vlmray.data.synthetic import write_synthetic

        root = join(run_dir, "data")
        fs, p = filesystem(join(root, "dataset.json"))
        if not fs.exists(p):
            write_synthetic(cfg.data.synthetic, root)
        return join(root, "train"), cfg.data.eval_source or join(root, "eval")
    train = cfg.data.source
    for sub in ("train", "shards"):          # a dataset root, or a curation job's output
        fs, p = filesystem(join(cfg.data.source, sub))
        if fs.isdir(p):
            train = join(cfg.data.source, sub)
            break
    default_eval = join(cfg.data.source, "eval")
    fs, p = filesystem(default_eval)
    return train, cfg.data.eval_source or (default_eval if fs.isdir(p) else "")


def _check_run_dir(run_dir: str, resume: bool) -> None:
    fs, p = filesystem(join(run_dir, "config.json"))
    if fs.exists(p) and not resume:
        raise ConfigError(f"{run_dir!r} already holds a run: pass --resume to continue it, "
                          "or choose another --output")


def run(cfg: Config, output: str | None = None, *, resume: bool = False) -> RunResult:
    """Validates ``cfg`` (before any Ray work), then curates, trains and evaluates."""
    from vlmray.data.ingest import run_ingest
    from vlmray.train.checkpoint import find_latest
    from vlmray.train.history import read_events, read_history
    from vlmray.train.report import dedup_by_step, write_json, write_summary
    from vlmray.train.trainer import build_trainer

    cfg = validate(cfg)
    run_dir = output or f"runs/{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "://" not in run_dir:
        run_dir = str(Path(run_dir).resolve())
    _check_run_dir(run_dir, resume)
    t0 = time.perf_counter()
    write_json(join(run_dir, "config.json"), cfg.to_dict())
    train_uri, eval_uri = resolve_data(cfg, run_dir)
    init_ray()
    plan = _retrieval(cfg, train_uri, eval_uri, run_dir)
    cfg = plan.config if plan else cfg
    ingest = run_ingest(cfg.data, train_uri, rejects_uri=join(run_dir, "rejects"),
                        retrieval=plan.stages if plan else None)
    print(f"[vlmray] ingest: {ingest.summary()}", flush=True)
    latest = find_latest(join(run_dir, "ray")) if resume else None
    launch = uuid.uuid4().hex[:12]
    from vlmray.data.augment import augment_train

    trainer = build_trainer(cfg, {"train": augment_train(cfg.data, ingest.train)}, run_dir=run_dir, eval_uri=eval_uri,
                            resume_from=str(latest) if latest else None, launch=launch,
                            eval_refs=plan.eval_refs if plan else "")
    result = trainer.fit()
    rows = dedup_by_step(read_history(run_dir))
    summary = _summarise(rows, ingest.summary(), time.perf_counter() - t0)
    summary.update(_attempts(read_events(run_dir), rows, launch), finished_at=time.time())
    checkpoint = result.checkpoint.path if result.checkpoint else None
    summary["checkpoint"] = checkpoint
    write_summary(run_dir, summary, rows)
    return RunResult(run_dir=run_dir, metrics=summary, checkpoint=checkpoint)


def _retrieval(cfg: Config, train_uri: str, eval_uri: str, run_dir: str) -> Any:
    """``data.retrieval``'s plan (index built, stages for ingest), or None when it is off.
    The config is rewritten when the plan fills a field (RA-CLIP's reference width)."""
    r = cfg.data.retrieval
    if not r.enabled and r.reference_fraction <= 0:
        return None
    from vlmray.retrieval.feed import prepare
    from vlmray.train.report import write_json

    plan = prepare(cfg, train_uri, eval_uri, run_dir)
    if plan.config is not cfg:
        write_json(join(run_dir, "config.json"), plan.config.to_dict())
    if plan.stats:
        print(f"[vlmray] retrieval: {_index_summary(plan.stats)}", flush=True)
    return plan


def _index_summary(stats: dict[str, Any]) -> str:
    parts = []
    for name, rep in stats.get("indexes", {}).items():
        parts.append(f"{name}: {rep.get('kind')} n={rep.get('n')} dim={rep.get('dim')} "
                     f"recall@10={rep.get('recall_at_10')}")
    if "eval_references_per_row" in stats:
        parts.append(f"held-out references per image {stats['eval_references_per_row']:.2f}")
    return "; ".join(parts) or str(stats)


def _summarise(rows: list[dict[str, Any]], ingest: dict[str, Any], wall_s: float) -> dict[str, Any]:
    evals = [r for r in rows if "zero_shot_top1" in r]
    last_eval = evals[-1] if evals else {}
    throughput = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    keys = ("zero_shot_top1", "zero_shot_top5", "zero_shot_chance", "retrieval_i2t_r1",
            "retrieval_i2t_r5", "retrieval_i2t_r10", "retrieval_t2i_r1", "retrieval_t2i_r5",
            "retrieval_t2i_r10")
    return {
        **{k: last_eval.get(k) for k in keys},
        "final_loss": rows[-1]["loss"] if rows else None,
        "steps": rows[-1]["step"] if rows else 0,
        "samples_seen": rows[-1].get("samples_seen") if rows else 0,
        "samples_per_s": sorted(throughput)[len(throughput) // 2] if throughput else None,
        "wall_s": wall_s,
        **ingest,
    }


def _attempts(events: list[dict[str, Any]], rows: list[dict[str, Any]],
              launch: str) -> dict[str, Any]:
    """This launch's worker-group starts (and any injected faults), from ``events.jsonl``:
    ``restarts`` (starts after the first) and ``attempts``, each start with the step and time
    of the first history row it logged (``first_step``, ``first_step_time``)."""
    first = next((i for i, e in enumerate(events) if e.get("launch") == launch), len(events))
    attempts = [dict(e) for e in events[first:]]
    for start in (e for e in attempts if e["event"] == "start"):
        after = [r for r in rows if r.get("time", 0.0) >= start["time"]]
        if after:
            start.update(first_step=after[0]["step"], first_step_time=after[0]["time"])
    starts = sum(e["event"] == "start" for e in attempts)
    return {"restarts": max(0, starts - 1), "attempts": attempts}


__all__ = ["RunResult", "init_ray", "resolve_data", "run"]
