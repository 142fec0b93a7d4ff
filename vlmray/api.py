"""The Python API: one call runs data preparation, ingest, training and evaluation.

    import vlmray
    cfg = vlmray.recipe("clip_tiny", **{"train.steps": 100})
    result = vlmray.run(cfg, output="runs/demo")
    print(result.metrics["zero_shot_top1"], result.checkpoint)
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmray.config import Config, ConfigError
from vlmray.data.storage import filesystem, is_remote, join
from vlmray.runtime import init_ray
from vlmray.validate import check_resume, validate


@dataclass
class RunResult:
    run_dir: str
    metrics: dict[str, Any]
    checkpoint: str | None


def resolve_data(cfg: Config, run_dir: str) -> tuple[str, str]:
    """Returns (train shards URI, held-out URI or ""), generating the built-in data if asked."""
    train, default_eval = _resolve_source(cfg, cfg.data.source, join(run_dir, "data"))
    return train, cfg.data.eval_source or default_eval


def resolve_sources(cfg: Config, run_dir: str) -> list[str]:
    """The train shards URI of every training source: ``data.source``, then each of
    ``data.extra_sources`` (built-in ones generated into ``<run>/data-<k>``)."""
    first, _ = resolve_data(cfg, run_dir)
    return [first] + [_resolve_source(cfg, spec, join(run_dir, f"data-{k}"))[0]
                      for k, spec in enumerate(cfg.data.extra_sources, start=1)]


def _resolve_source(cfg: Config, spec: str, builtin_root: str) -> tuple[str, str]:
    """(train URI, held-out URI or "") of one source spec: ``builtin[:<seed>?...]`` generated
    into ``builtin_root`` once, or a dataset root / curation output / shard directory."""
    from vlmray.config.sources import builtin_config, is_builtin

    if is_builtin(spec):
        from vlmray.data.synthetic import ensure_synthetic

        ensure_synthetic(builtin_config(spec, cfg.data.synthetic), builtin_root)
        return join(builtin_root, "train"), join(builtin_root, "eval")
    train = spec
    for sub in ("train", "shards"):          # a dataset root, or a curation job's output
        fs, p = filesystem(join(spec, sub))
        if fs.isdir(p):
            train = join(spec, sub)
            break
    default_eval = join(spec, "eval")
    fs, p = filesystem(default_eval)
    return train, (default_eval if fs.isdir(p) else "")


def _check_rewrite(cfg: Config) -> None:
    """Before any Ray work: the ``data.rewrite`` backend and captioner can load, and an
    objective that reads synthetic captions has them."""
    from vlmray.models.outputs import SYNTHETIC_TEXT_EMBEDS
    from vlmray.objectives import OBJECTIVES

    readers = [s.name for s in cfg.objectives
               if SYNTHETIC_TEXT_EMBEDS in OBJECTIVES.get(s.name).needs]
    if readers and "synthetic_caption" not in cfg.data.extra_texts:
        raise ConfigError(f"objectives {readers} read synthetic captions: set "
                          "data.rewrite.captioner (oracle, transformers, vllm) or add "
                          "'synthetic_caption' to data.extra_texts for shards that carry them")
    if cfg.data.rewrite.enabled:
        from vlmray.rewrite.stage import check_rewrite

        try:
            check_rewrite(cfg.data.rewrite)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise ConfigError(f"data.rewrite: {e}") from None


def _check_run_dir(run_dir: str, resume: bool, cfg: Config | None = None) -> None:
    """Before any work: the run dir is apart from every data input, and new, empty or a run
    (``config.json``; continuing one takes ``resume``) (:mod:`vlmray.data.outputs`)."""
    from vlmray.config.sources import is_builtin
    from vlmray.data.outputs import check_output

    specs = [] if cfg is None else [cfg.data.source, *cfg.data.extra_sources,
                                    cfg.data.eval_source, cfg.data.retrieval.index_dir]
    check_output(run_dir, [s for s in specs if s and not is_builtin(s)], job="pretrain",
                 markers=("config.json",))
    fs, p = filesystem(join(run_dir, "config.json"))
    if fs.exists(p) and not resume:
        raise ConfigError(f"{run_dir!r} already holds a run: pass --resume to continue it, "
                          "or choose another --output")


def _check_resume(run_dir: str, cfg: Config, resume: bool) -> None:
    """Before any work: a ``--resume`` whose config the run's checkpoint cannot load into fails,
    listing the changes (:func:`vlmray.validate.check_resume`), and the stored ``config.json``
    stays as it was."""
    fs, p = filesystem(join(run_dir, "config.json"))
    if resume and fs.exists(p):
        check_resume(json.loads(fs.cat_file(p)), cfg, run_dir)


def _check_local_sources(cfg: Config) -> None:
    """Before any work: every local training source has input files (its ``train/`` or
    ``shards/`` folder, a folder of shards, a file or a glob). Remote sources are listed when
    ingest plans them; the held-out split is :func:`_check_eval_source`'s."""
    from vlmray.config.sources import is_builtin
    from vlmray.data.curation.readers import list_inputs

    named = [("data.source", cfg.data.source),
             *(("data.extra_sources", spec) for spec in cfg.data.extra_sources)]
    for name, spec in named:
        if is_builtin(spec) or is_remote(spec):
            continue
        try:
            list_inputs(_resolve_source(cfg, spec, "")[0])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{name}={spec!r}: {e}") from None


def _check_eval_source(cfg: Config) -> str:
    """Before any work: the held-out split (``data.eval_source``, else a non-built-in
    source's ``eval/``) is one :mod:`vlmray.eval.sources` accepts: its shards or class
    folders, class names and templates, and (local) the labels of its first
    ``eval.max_samples`` rows. Returns the line to print at start: the split and where its
    classes come from, or that the run has none (its ``metrics.json`` says ``"eval": "none"``).
    Raises ``ConfigError`` naming the file looked for and the accepted shapes."""
    from vlmray.config.sources import is_builtin
    from vlmray.eval.sources import EvalSourceError, check_eval_source

    uri, name = cfg.data.eval_source, "data.eval_source"
    if not uri:
        if is_builtin(cfg.data.source):
            return "held-out split: the built-in data's eval/ (classes.json)"
        uri, name = _resolve_source(cfg, cfg.data.source, "")[1], "data.source's eval/"
        if not uri:
            return (f"no held-out split: data.eval_source is unset and {cfg.data.source!r} has "
                    "no eval/ folder, so zero-shot and retrieval are not measured "
                    "(metrics.json: \"eval\": \"none\"); set data.eval_source to shards with "
                    "classes.json / classnames.txt, or to an ImageNet-style <class>/<image> "
                    "folder")
    try:
        src = check_eval_source(uri, max_samples=0 if is_remote(uri) else cfg.eval.max_samples)
    except EvalSourceError as e:
        raise ConfigError(f"{name}={uri!r}: {e}") from None
    except OSError as e:      # unreadable storage: as the check of the training sources says
        raise ConfigError(f"{name}={uri!r}: {type(e).__name__}: {e}") from None
    if src.kind == "imagefolder" and cfg.data.retrieval.attach == "references":
        raise ConfigError(f"{name}={uri!r} is an ImageNet-style folder: RA-CLIP's held-out "
                          "references (data.retrieval.attach='references') read shards; point "
                          "data.eval_source at shards with a class-names file")
    return f"held-out split: {src.describe()}"


def run(cfg: Config, output: str | None = None, *, resume: bool = False) -> RunResult:
    """Validates ``cfg``, then checks the run directory, a ``--resume``'s changes, the local
    sources and the held-out split (printing which it is, or that there is none), all before
    any Ray work or any file is written; then curates, trains and
    evaluates. ``config.json`` is written when training starts, so a run that fails before can
    be rerun as it was; a run that fails after the checks still writes ``metrics.json``, with
    the error (and re-raises it)."""
    cfg = validate(cfg)
    _check_rewrite(cfg)
    run_dir = output or f"runs/{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "://" not in run_dir:
        run_dir = str(Path(run_dir).resolve())
    _check_run_dir(run_dir, resume, cfg)
    _check_resume(run_dir, cfg, resume)
    _check_local_sources(cfg)
    print(f"[vlmray] {_check_eval_source(cfg)}", flush=True)
    t0 = time.perf_counter()
    try:
        return _run(cfg, run_dir, resume=resume, t0=t0)
    except Exception as e:
        _write_failure(run_dir, e, time.perf_counter() - t0)
        raise


def _run(cfg: Config, run_dir: str, *, resume: bool, t0: float) -> RunResult:
    """The work of :func:`run` once every check passed: data, ingest, training, summary."""
    from vlmray.data.outputs import claim_output
    from vlmray.data.placement import apply_budget
    from vlmray.pipelines.training import training_feed
    from vlmray.train.checkpoint import find_latest
    from vlmray.train.history import read_events, read_history
    from vlmray.train.report import dedup_by_step, write_json, write_summary
    from vlmray.train.trainer import build_trainer

    claim_output(run_dir, "pretrain")    # a rerun of a run that failed before training is one
    train_uri, eval_uri = resolve_data(cfg, run_dir)
    train_uris = resolve_sources(cfg, run_dir)
    init_ray()
    apply_budget(cfg.data.placement)     # before any plan is built: datasets copy the context
    plan = _retrieval(cfg, train_uri, eval_uri, run_dir)
    cfg = plan.config if plan else cfg
    feed = training_feed(cfg, run_dir, train_uris, plan)
    latest = find_latest(join(run_dir, "ray")) if resume else None
    launch = uuid.uuid4().hex[:12]
    sizes = feed.sizes
    trainer = build_trainer(cfg, feed.datasets, run_dir=run_dir, eval_uri=eval_uri,
                            resume_from=str(latest) if latest else None, launch=launch,
                            eval_refs=plan.eval_refs if plan else "", source_sizes=sizes,
                            feeds=feed.feeds)
    write_json(join(run_dir, "config.json"), cfg.to_dict())   # the run starts: now it is one
    result = trainer.fit()
    rows = dedup_by_step(read_history(run_dir))
    summary = _summarise(rows, feed.summary(), time.perf_counter() - t0)
    summary.update(_attempts(read_events(run_dir), rows, launch), finished_at=time.time())
    if sizes:
        summary["source_sizes"] = sizes          # what single-source sampling drew by
    checkpoint = result.checkpoint.path if result.checkpoint else None
    summary["checkpoint"] = checkpoint
    write_summary(run_dir, summary, rows)
    return RunResult(run_dir=run_dir, metrics=summary, checkpoint=checkpoint)


def _write_failure(run_dir: str, error: Exception, wall_s: float) -> None:
    """``metrics.json`` of a run that failed after its checks: the error, and what its
    history holds (steps, skipped steps, the last loss). Never masks the error itself."""
    from vlmray.train.history import read_history
    from vlmray.train.report import dedup_by_step, write_json

    try:
        rows = dedup_by_step(read_history(run_dir))
        write_json(join(run_dir, "metrics.json"),
                   {**_summarise(rows, {}, wall_s), "failed": True,
                    "error": f"{type(error).__name__}: {error}", "finished_at": time.time()})
    except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
        print(f"[vlmray] could not write metrics.json of the failed run: {e}", flush=True)


def _retrieval(cfg: Config, train_uri: str, eval_uri: str, run_dir: str) -> Any:
    """``data.retrieval``'s plan (index built, stages for ingest), or None when it is off.
    ``plan.config`` fills what the plan knows (RA-CLIP's reference width); it is the run's
    ``config.json`` once training starts."""
    r = cfg.data.retrieval
    if not r.enabled and r.reference_fraction <= 0:
        return None
    from vlmray.pipelines.retrieval import bootstrap_plan, prepare

    bootstrapped = ""
    if r.needs_bootstrap:   # RA-CLIP's own embedder: a short plain-CLIP run comes first
        bootstrapped, boot, resume = bootstrap_plan(cfg, run_dir)
        if boot is not None:
            run(boot, output=bootstrapped, resume=resume)
    plan = prepare(cfg, train_uri, eval_uri, run_dir, bootstrapped=bootstrapped)
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


_EVAL_KEYS = ("zero_shot_top1", "zero_shot_top5", "zero_shot_chance", "retrieval_i2t_r1",
              "retrieval_i2t_r5", "retrieval_i2t_r10", "retrieval_t2i_r1", "retrieval_t2i_r5",
              "retrieval_t2i_r10")


def _summarise(rows: list[dict[str, Any]], ingest: dict[str, Any],
               wall_s: float) -> dict[str, Any]:
    """``metrics.json``'s figures from the history rows: the last evaluation's (flat names,
    ``last_eval_step``), the best one by zero-shot top-1 (``best_zero_shot_top1``,
    ``best_step``, ``best_eval`` with its figures; the earliest on a tie), ``evaluations``
    and ``eval`` (``"held-out"``, or ``"none"`` when the run made no evaluation), then the
    training figures and ``ingest``'s counts."""
    evals = [r for r in rows if "zero_shot_top1" in r]
    last_eval = evals[-1] if evals else {}
    scored = [r for r in evals if isinstance(r["zero_shot_top1"], (int, float))
              and r["zero_shot_top1"] == r["zero_shot_top1"]]           # not None, not NaN
    best = max(scored, key=lambda r: r["zero_shot_top1"], default={})
    throughput = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return {
        **{k: last_eval.get(k) for k in _EVAL_KEYS},
        **_other_eval_metrics(rows, last_eval),
        "eval": "held-out" if evals else "none",
        "evaluations": len(evals),
        "last_eval_step": last_eval.get("step"),
        "best_zero_shot_top1": best.get("zero_shot_top1"),
        "best_step": best.get("step"),
        "best_eval": {k: best[k] for k in _EVAL_KEYS if k in best},
        "final_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
        "steps": rows[-1]["step"] if rows else 0,
        "skipped_steps": rows[-1].get("skipped_steps", 0) if rows else 0,
        "samples_seen": rows[-1].get("samples_seen") if rows else 0,
        "samples_per_s": sorted(throughput)[len(throughput) // 2] if throughput else None,
        "wall_s": wall_s,
        **ingest,
    }


_STEP_KEYS = frozenset({"step", "epoch", "loss", "lr", "logit_scale", "grad_norm", "temperature",
                        "samples_seen", "samples_per_s", "data_wait_frac", "skipped_steps"})


def _other_eval_metrics(rows: list[dict[str, Any]], last_eval: dict[str, Any]) -> dict[str, Any]:
    """The last evaluation's figures from the objectives' and the model's own evaluation
    (caption BLEU, ITM accuracy, grounding, mIoU...): flat names that rows without an
    evaluation never carry."""
    train_keys = set(_STEP_KEYS).union(*(r.keys() for r in rows if "zero_shot_top1" not in r))
    return {k: v for k, v in last_eval.items()
            if k not in train_keys and "/" not in k and not k.startswith(("zero_shot_",
                                                                         "retrieval_"))}


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


__all__ = ["RunResult", "resolve_data", "resolve_sources", "run"]
