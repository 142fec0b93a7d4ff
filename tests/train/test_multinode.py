"""Two Ray nodes on one machine: a 2-worker ``TorchTrainer`` (gloo) puts one worker on each,
and data-parallel CLIP (``gather="local"`` + DDP) equals one process on the whole batch.

A module fixture starts a head (``trainer_slot: 1, node_a: 1``) and a second node that joins
it (``trainer_slot: 1, node_b: 1``), each ``ray start --block`` in its own session on
127.0.0.1 (tests/plugins/ray_head.py), connects this process to that cluster only (any other
Ray connection of the pytest process is shut down first) and stops only those two nodes.

Each worker requests ``{"CPU": 0.5, "trainer_slot": 1}`` (``train.worker_resources`` through
``scaling_for``), so Ray Train must place the two workers on different nodes.

    python -m pytest tests/train/test_multinode.py -q        # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as torch_dist
from torch import Tensor

import vlmray
from tests.plugins.ray_head import Head, Node, start_head, start_worker_node, stop_nodes
from vlmray.config import Config
from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema
from vlmray.data.ingest import tokenizer_for
from vlmray.distributed import Dist
from vlmray.train.state import TrainState, build_state
from vlmray.train.trainer import scaling_for
from vlmray.validate import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GLOBAL_BATCH = 8
TINY = {
    "model.vision_kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    "model.text": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 32,
                   "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "model.embed_dim": 16, "data.vocab_size": 512, "data.context_length": 12,
    "train.batch_size": GLOBAL_BATCH, "train.num_workers": 2, "train.cpus_per_worker": 0.5,
    "train.worker_resources": {"trainer_slot": 1}, "train.device": "cpu",
    "train.precision": "fp32", "train.seed": 3,
}
GRADS = ("log_logit_scale", "text_proj.weight", "image_proj.weight")


def tiny_config() -> Config:
    """clip_tiny shrunk, float32 on CPU, CLIP with ``gather="local"``, 2 workers."""
    cfg = vlmray.recipe("clip_tiny", **TINY)
    cfg.objectives = [ObjectiveSpec(name="clip", params={"gather": "local"})]
    return validate(cfg)


# --- the computation, shared by the workers and the single-process reference -------------------


def global_batch(cfg: Config, seed: int = 11) -> dict[str, Tensor]:
    """A fixed (GLOBAL_BATCH, ...) batch: random uint8 pixels, tokens and ragged masks."""
    g = torch.Generator().manual_seed(seed)
    n, s, length = GLOBAL_BATCH, cfg.data.image_size, cfg.data.context_length
    vocab = tokenizer_for(cfg.data).vocab_size
    lengths = torch.randint(3, length + 1, (n, 1), generator=g)
    return {schema.PIXELS: torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8),
            schema.TOKENS: torch.randint(3, vocab, (n, length), generator=g),
            schema.TOKEN_MASK: (torch.arange(length) < lengths).long()}


def forward_backward(state: TrainState, batch: dict[str, Tensor], dist: Dist) -> dict:
    """One forward + backward of the objective mix (no optimiser step); returns this rank's loss,
    the gradient-norm over every parameter, and the GRADS tensors flattened."""
    state.model.eval()  # no dropout anywhere: ranks and the reference see identical maths
    out = state.model(batch, state.mix.needs)
    result = state.mix(batch, out, dist)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    named = dict(state.core.named_parameters())
    norm = math.sqrt(sum(float(p.grad.double().square().sum())
                         for p in named.values() if p.grad is not None))
    return {"loss": float(result.loss.detach()), "grad_norm": norm,
            **{f"grad/{n}": named[n].grad.flatten().tolist() for n in GRADS}}


def train_fn(config: dict) -> dict:
    """Per worker: rank r takes rows [r*B, (r+1)*B) of the global batch, forward/backward under
    DDP; returns (Ray Train keeps rank 0's as ``Result.return_value``) the mean loss over ranks,
    the all-reduced gradients, and every rank's node ID."""
    torch.set_num_threads(1)
    cfg = Config.from_dict(config["cfg"])
    dist = Dist.from_env(device=torch.device("cpu"))
    state = build_state(cfg, device=torch.device("cpu"), wrap=ray.train.torch.prepare_model)
    b = GLOBAL_BATCH // dist.world_size
    local = {k: v[dist.rank * b:(dist.rank + 1) * b] for k, v in global_batch(cfg).items()}
    metrics = forward_backward(state, local, dist)
    nodes: list = [None] * dist.world_size
    torch_dist.all_gather_object(nodes, (ray.get_runtime_context().get_node_id(),
                                         socket.gethostname(), metrics["loss"]))
    metrics.update(node_ids=[n[0] for n in nodes], rank_losses=[n[2] for n in nodes],
                   world_size=dist.world_size, ddp=type(state.model).__name__,
                   loss=sum(n[2] for n in nodes) / dist.world_size)
    return metrics


# --- the cluster ---------------------------------------------------------------------------------


def _wait_for_nodes(n: int, joined: list[Node], timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [node for node in ray.nodes() if node["Alive"]]
        if len(alive) >= n:
            return alive
        time.sleep(1)
    logs = "\n".join(node.log.read_text()[-2000:] for node in joined)
    raise AssertionError(f"expected {n} alive Ray nodes, have {ray.nodes()}\n{logs}")


def _connect(head: Head, timeout: float = 90) -> None:
    """``ray.init`` to ``head`` once its GCS answers (retrying while it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=head.address, log_to_driver=False, _node_ip_address="127.0.0.1")
            return
        except (ConnectionError, RuntimeError):
            ray.shutdown()
            if time.monotonic() > deadline or head.proc.poll() is not None:
                raise AssertionError(f"cannot connect to {head.address}:\n"
                                     f"{head.log.read_text()[-4000:]}") from None
            time.sleep(2)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[list[dict]]:
    """Head (node_a) + a joined node (node_b), both 1 CPU and one trainer_slot; yields the alive
    node records."""
    ray.shutdown()  # this module's connection only: none left over from another module
    head = start_head(num_cpus=1, resources={"trainer_slot": 1, "node_a": 1}, dashboard=False,
                      object_store_mb=100, repo_on_path=True)
    nodes = []
    try:
        _connect(head)
        nodes.append(start_worker_node(head, num_cpus=1,
                                       resources={"trainer_slot": 1, "node_b": 1}))
        yield _wait_for_nodes(2, nodes)
    finally:
        ray.shutdown()
        stop_nodes(head, *nodes)


def test_cluster_has_two_distinct_nodes(two_nodes: list[dict]) -> None:
    assert len(two_nodes) == 2
    assert len({n["NodeID"] for n in two_nodes}) == 2
    custom = sorted(k for n in two_nodes for k in n["Resources"] if k.startswith("node_"))
    assert custom == ["node_a", "node_b"]
    assert all(n["Resources"].get("trainer_slot") == 1 for n in two_nodes)
    assert ray.cluster_resources().get("trainer_slot") == 2


def test_two_node_ddp_matches_single_process(two_nodes: list[dict], tmp_path: Path) -> None:
    cfg = tiny_config()
    scaling = scaling_for(cfg.train)
    assert scaling.num_workers == 2 and not scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 0.5, "trainer_slot": 1}
    trainer = ray.train.torch.TorchTrainer(
        train_fn, train_loop_config={"cfg": cfg.to_dict()}, scaling_config=scaling,
        torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="multinode", storage_path=str(tmp_path)))
    got = trainer.fit().return_value

    assert got["world_size"] == 2 and got["ddp"] == "DistributedDataParallel"
    assert len(set(got["node_ids"])) == 2, got["node_ids"]
    assert set(got["node_ids"]) == {n["NodeID"] for n in two_nodes}

    state = build_state(cfg, device=torch.device("cpu"))
    want = forward_backward(state, global_batch(cfg), Dist())
    print(f"\nloss 2 workers {got['loss']:.8f} (ranks {got['rank_losses']}) vs 1 process "
          f"{want['loss']:.8f}; grad norm {got['grad_norm']:.8f} vs {want['grad_norm']:.8f}")
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-5)
    for name in GRADS:
        a, b = torch.tensor(got[f"grad/{name}"]), torch.tensor(want[f"grad/{name}"])
        assert a.shape == b.shape and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
