"""AdamW parameter groups, warmup + cosine schedule, and checkpoint save/load/find_latest.

    pytest tests/train/test_optim_checkpoint.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from vlmray.config import ModelConfig, TrainConfig
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.distributed import Dist
from vlmray.models import DualEncoder, build_model
from vlmray.objectives import ObjectiveMix
from vlmray.train.checkpoint import (
    Progress,
    find_latest,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from vlmray.train.optim import build_optimizer, lr_factor, param_groups

S, V, L = 16, 128, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int) -> DualEncoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vision_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
                      text={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 32}, embed_dim=8)
    return build_model(cfg, image_size=S, vocab_size=V, context_length=L)


def tiny_batch(seed: int = 0, n: int = 4) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {schema.PIXELS: torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8),
            schema.TOKENS: torch.randint(3, V, (n, L), generator=g),
            schema.TOKEN_MASK: torch.ones(n, L, dtype=torch.long)}


# --- parameter groups ---------------------------------------------------------------------------


def test_param_groups_partition_and_no_decay_rules() -> None:
    model = tiny_model(0)
    model.text.encoder.embeddings.word_embeddings.weight.requires_grad_(False)   # frozen: skipped
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    ids = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(ids) and len(grouped) == len(set(grouped))   # each once
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    decay_names = {ids[id(p)] for p in decay["params"]}
    assert "log_logit_scale" in no_decay_names
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or "norm" in name.lower() or p.ndim < 2:
            assert name in no_decay_names, name
    assert {"image_proj.weight", "text_proj.weight"} <= decay_names
    assert any("attn.qkv.weight" in n for n in decay_names)
    assert any("attention.self.query.weight" in n for n in decay_names)


def test_adamw_step_decays_only_matrices() -> None:
    """With zero gradients AdamW only applies decay: p <- p * (1 - lr * wd) on the decay group."""
    model = tiny_model(0)
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, steps=10)
    opt, _ = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        if id(p) in decayed:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[name]), name
    assert torch.equal(model.log_logit_scale.detach(), before["log_logit_scale"])


# --- schedule -----------------------------------------------------------------------------------


def ref_factor(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def test_lr_factor_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.05)
    factors = [lr_factor(s, cfg) for s in range(131)]
    for s, f in enumerate(factors):
        assert f == pytest.approx(ref_factor(s, 10, 100, 0.05)), s
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))   # strictly rising warmup
    assert all(a >= b for a, b in zip(factors[10:101], factors[11:101]))   # then falling
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.05 + 0.95 * 0.5)          # cosine half way
    assert factors[100] == pytest.approx(0.05) and factors[130] == pytest.approx(0.05)
    assert lr_factor(0, TrainConfig(steps=10, warmup_steps=0)) == pytest.approx(1.0)


def test_scheduler_reaches_min_lr_at_the_last_step() -> None:
    cfg = TrainConfig(steps=20, warmup_steps=4, lr=0.01, min_lr_ratio=0.1)
    opt, sched = build_optimizer(nn.Linear(2, 2), cfg)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(cfg.steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(0.01 / 4)                        # step 0 trains at warmup lr
    assert max(lrs) == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.01 * 0.1)                     # after the final step
    assert all(g["lr"] == pytest.approx(lrs[-1]) for g in opt.param_groups)


# --- checkpoints --------------------------------------------------------------------------------


def _train(model: DualEncoder, opt: torch.optim.Optimizer, sched: object, steps: int,
           seed: int) -> None:
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip")])
    for i in range(steps):
        b = tiny_batch(seed + i)
        loss = mix(b, model(b, mix.needs), Dist()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1e-2)
    model = tiny_model(0)
    opt, sched = build_optimizer(model, cfg)
    _train(model, opt, sched, 3, seed=0)
    progress = Progress(step=3, epoch=1, batch_in_epoch=2, samples_seen=12)
    config = {"train": {"steps": 10}, "recipe": "clip_tiny"}
    path = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched,
                           progress=progress, config=config)
    assert read_config(path) == config

    other = tiny_model(1)
    opt2, sched2 = build_optimizer(other, cfg)
    assert load_checkpoint(path, model=other, optimizer=opt2, scheduler=sched2) == progress
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.last_epoch == sched.last_epoch == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, st in s1["state"].items():
        for field, value in st.items():
            assert torch.equal(value, s2["state"][k][field]), (k, field)

    torch.manual_seed(7)                                            # same dropout masks
    _train(model, opt, sched, 2, seed=100)                          # resumed == uninterrupted
    torch.manual_seed(7)
    _train(other, opt2, sched2, 2, seed=100)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name

    fresh = tiny_model(2)                                           # model only
    assert load_checkpoint(path, model=fresh).step == 3


def test_find_latest_picks_the_highest_step(tmp_path: Path) -> None:
    assert find_latest(tmp_path) is None
    model = tiny_model(0)
    opt, sched = build_optimizer(model, TrainConfig())
    for name, step in [("z_first", 5), ("a_second", 20), ("m_third", 3)]:
        save_checkpoint(tmp_path / "run" / name, model=model, optimizer=opt, scheduler=sched,
                        progress=Progress(step=step), config={})
    partial = tmp_path / "run" / "b_partial"                        # no state.pt: not complete
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"step": 100}))
    copying = tmp_path / "run" / "c_copying"       # state.pt there, progress.json still empty
    save_checkpoint(copying, model=model, optimizer=opt, scheduler=sched,
                    progress=Progress(step=200), config={})
    (copying / "progress.json").write_text("")
    assert find_latest(tmp_path) == tmp_path / "run" / "a_second"
    assert find_latest(tmp_path / "run" / "m_third") == tmp_path / "run" / "m_third"
