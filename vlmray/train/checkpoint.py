"""Checkpoints: one directory holding ``state.pt`` (model, optimiser, scheduler, data position)
and ``config.json`` (enough to rebuild the model for evaluation)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmray.data.storage import filesystem, is_remote, join, to_uri

STATE = "state.pt"
CONFIG = "config.json"
PROGRESS = "progress.json"


@dataclass
class SourcePosition:
    """Where one training source's stream stands: its epoch, and batches of that epoch
    already trained on."""

    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Progress:
    """Where training stands: optimiser steps done, and the position in the data stream.

    One stream (``data.sampling="mixed"``): ``epoch`` and ``batch_in_epoch``, ``sources``
    empty. Several streams (``"single_source"``): ``sources[k]`` is source k's position, and
    ``epoch`` / ``batch_in_epoch`` mirror the source the last step drew from (informational).
    Checkpoints written before ``sources`` existed load with it empty."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    sources: list[SourcePosition] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        d = dict(d)
        sources = [SourcePosition(**s) for s in d.pop("sources", [])]
        return cls(**d, sources=sources)

    def positions(self, n: int) -> list[SourcePosition]:
        """The n sources' positions, created on first use: source 0 continues a single-stream
        position (a checkpoint of a one-source run), the others start at the beginning. A
        different, non-zero number of recorded sources is an error (the sources changed)."""
        if not self.sources:
            self.sources = [SourcePosition(self.epoch, self.batch_in_epoch)]
            self.sources += [SourcePosition() for _ in range(n - 1)]
        if len(self.sources) != n:
            raise ValueError(f"the checkpoint records {len(self.sources)} data sources' "
                             f"positions but this run has {n}: resume with the same sources")
        return self.sources


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, config: dict,
                    objectives: nn.Module | None = None) -> Path:
    """``objectives``: the objective mix, whose state (e.g. DeCLIP's feature queue) is saved
    when it has any."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "progress": asdict(progress)}
    if objectives is not None and objectives.state_dict():
        state["objectives"] = objectives.state_dict()
    torch.save(state, path / STATE)
    (path / CONFIG).write_text(json.dumps(config, indent=1))
    (path / PROGRESS).write_text(json.dumps(asdict(progress)))
    return path


def load_checkpoint(path: str | Path, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    objectives: nn.Module | None = None) -> Progress:
    """Restores what is given in place; returns the saved progress."""
    state = torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if objectives is not None and "objectives" in state:
        objectives.load_state_dict(state["objectives"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return Progress.from_dict(state["progress"])


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / CONFIG).read_text())


def find_latest(root: str | Path) -> Path | str | None:
    """The checkpoint directory under ``root`` (itself included) with the most steps, or None.

    ``root`` is a local path or a URI (``s3://bucket/run/ray``); a directory counts once both its
    ``progress.json`` and ``state.pt`` exist and ``progress.json`` parses (Ray Train copies a
    reported checkpoint into storage file by file, so a reader may meet it half-written). Returns a ``Path`` for a local root (absolute) and
    a URI string for a remote one.
    """
    fs, base = filesystem(str(root))
    best, best_step = None, -1
    for marker in sorted(set(fs.glob(join(base, "**", PROGRESS)))):
        parent = marker.rsplit("/", 1)[0]
        if not fs.isfile(join(parent, STATE)):
            continue
        try:
            step = int(json.loads(fs.cat_file(marker))["step"])
        except (ValueError, KeyError, TypeError, OSError):
            continue  # still being copied into storage (empty or partial): not complete yet
        if step > best_step:
            best, best_step = parent, step
    if best is None:
        return None
    return to_uri(fs, best) if is_remote(str(root)) else Path(best)


__all__ = ["Progress", "SourcePosition", "find_latest", "load_checkpoint", "read_config",
           "save_checkpoint"]
