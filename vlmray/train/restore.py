"""Where a training run (re)starts: the newest intact checkpoint among Ray Train's own, the one
``--resume`` named and the newest on the run's storage, loaded into the worker's state, with
what it holds beside the weights (``extra``: the data cursor, every worker's RNG state, the
ingest tally) handed back to the loop."""

from __future__ import annotations

import json
from typing import Any

import ray.train

from vlmray.data.storage import arrow_filesystem, is_remote, join
from vlmray.train.checkpoint import (
    PROGRESS,
    IncompleteCheckpointError,
    find_latest,
    load_checkpoint,
)
from vlmray.train.state import TrainState


def checkpoint_at(uri: str) -> ray.train.Checkpoint:
    """A Ray ``Checkpoint`` for a checkpoint directory: a local path or an ``s3://`` URI (read
    through :func:`vlmray.data.storage.arrow_filesystem`, so the AWS environment applies)."""
    if not is_remote(uri):
        return ray.train.Checkpoint.from_directory(uri)
    fs, path = arrow_filesystem(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def checkpoint_step(ckpt: ray.train.Checkpoint) -> int:
    """The step a checkpoint was saved at (its ``progress.json``, read without downloading);
    -1 when that is missing or cut short (the checkpoint is tried last, and fails its check)."""
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{PROGRESS}") as f:
            return int(json.loads(f.read())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def restore(state: TrainState, resume_from: str | None, run_dir: str,
             extra: dict[str, Any] | None = None) -> str:
    """Restores the newest (by step) of: Ray Train's latest checkpoint of this run (after a
    worker-group restart, or on a re-run of the same run directory), the checkpoint directory
    ``--resume`` named, and the newest complete one on this run's storage (Ray's record lags
    behind storage when a worker or the driver dies soon after reporting one). A tie keeps the
    earlier in that order; one whose files fail their manifest is skipped for the next (storage's
    is the newest intact one). Returns ``"ray"``, ``"resume"``, ``"storage"`` or ``"fresh"``;
    ``extra``, when given, is filled with the checkpoint's extra state (empty when fresh)."""
    found = [(ray.train.get_checkpoint(), "ray")]
    if resume_from:
        found.append((checkpoint_at(resume_from), "resume"))
    if on_storage := find_latest(join(run_dir, "ray")):
        found.append((checkpoint_at(str(on_storage)), "storage"))
    found = [(ckpt, source) for ckpt, source in found if ckpt is not None]
    if not found:
        return "fresh"
    for ckpt, source in sorted(found, key=lambda cs: -checkpoint_step(cs[0])):   # stable
        with ckpt.as_directory() as d:
            try:
                state.progress = load_checkpoint(d, model=state.core, optimizer=state.optimizer,
                                                 scheduler=state.scheduler, objectives=state.mix,
                                                 extra=extra)
            except IncompleteCheckpointError as e:
                print(f"[vlmray] {source} checkpoint skipped: {e}", flush=True)
                continue
        return source
    raise IncompleteCheckpointError(f"no intact checkpoint among {[s for _, s in found]}")


__all__ = ["checkpoint_at", "checkpoint_step", "restore"]
