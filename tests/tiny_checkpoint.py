"""A run directory holding one checkpoint of a tiny, randomly initialised default model: what
scoring and embedding stages load as ``<run dir>``."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmray.config import Config
from vlmray.train.checkpoint import Progress, save_checkpoint
from vlmray.train.state import build_core_model


def save_tiny_checkpoint(run: Path, *, step: int = 1) -> tuple[Config, torch.nn.Module]:
    """Writes ``<run>/ray/checkpoint_<step>`` (seed 0) and returns its config and model."""
    cfg = Config()
    torch.manual_seed(0)
    model = build_core_model(cfg).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    save_checkpoint(run / "ray" / f"checkpoint_{step:06d}", model=model, optimizer=opt,
                    scheduler=sched, progress=Progress(step=step), config=cfg.to_dict())
    return cfg, model
