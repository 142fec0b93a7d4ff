"""Everything one worker trains with, built from a Config: model, objectives, optimiser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmray.config import Config
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.eval import evaluate, load_heldout
from vlmray.models import DualEncoder, build_model
from vlmray.objectives import ObjectiveMix, SetupContext
from vlmray.train.checkpoint import Progress
from vlmray.train.optim import build_optimizer


@dataclass
class TrainState:
    cfg: Config
    model: nn.Module          # what the step calls: the core model, or it wrapped in DDP
    core: DualEncoder         # the unwrapped model (checkpoints, eval, logit scale)
    mix: ObjectiveMix
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    bf16: bool
    grad_clip: float
    progress: Progress = field(default_factory=Progress)

    def evaluator(self, eval_uri: str,
                  eval_refs: str = "") -> Callable[[DualEncoder], dict[str, float]] | None:
        """A function scoring a model on the held-out split (loaded once), or None without one.
        ``eval_refs``: the held-out images' RA-CLIP references (a parquet file), if any."""
        if not eval_uri:
            return None
        tok = tokenizer_for(self.cfg.data)
        data = load_heldout(eval_uri, decode_spec(self.cfg.data), tok,
                            max_samples=self.cfg.eval.max_samples)
        if eval_refs:
            data = data.with_refs(eval_refs)
        return lambda model: evaluate(model, data, tok, batch_size=self.cfg.eval.batch_size,
                                      objectives=self.mix)


def build_core_model(cfg: Config) -> DualEncoder:
    tok = tokenizer_for(cfg.data)
    return build_model(cfg.model, image_size=cfg.data.image_size, vocab_size=tok.vocab_size,
                       context_length=cfg.data.context_length)


def setup_context(cfg: Config, core: nn.Module) -> SetupContext:
    """What objectives size their own parameters from (``Objective.setup``)."""
    text_width = getattr(getattr(core, "text", None), "width", 0)   # 0: no text tower
    vision = getattr(core, "vision", None)
    return SetupContext(model=core, embed_dim=cfg.model.embed_dim, text_width=text_width,
                        vocab_size=tokenizer_for(cfg.data).vocab_size,
                        image_size=cfg.data.image_size, tokenizer=tokenizer_for(cfg.data),
                        patch_grid=getattr(vision, "patch_grid", None))


def build_state(cfg: Config, *, device: torch.device,
                wrap: Callable[[nn.Module], nn.Module] | None = None) -> TrainState:
    """Seeds, builds the model on ``device`` and (optionally) wraps it for data parallelism."""
    torch.manual_seed(cfg.train.seed)
    core = build_core_model(cfg).to(device)
    mix = ObjectiveMix.from_specs(cfg.objectives).setup(setup_context(cfg, core)).to(device)
    model = wrap(core) if wrap is not None else core
    optimizer, scheduler = build_optimizer(nn.ModuleList([core, mix]), cfg.train)
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    return TrainState(cfg=cfg, model=model, core=core, mix=mix, optimizer=optimizer,
                      scheduler=scheduler, bf16=bf16, grad_clip=cfg.train.grad_clip)


__all__ = ["TrainState", "build_core_model", "build_state", "setup_context"]
