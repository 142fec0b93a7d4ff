"""Training throughput: the full Ray pipeline against a bare PyTorch loop on the same model.

    python benchmarks/train_throughput.py --steps 120 --batch-size 128 --output runs/bench

Pipeline: ``vlmray.run`` on a private local Ray head (Ray Data ingest -> ``iter_torch_batches``
-> Ray Train ``TorchTrainer`` step), measured from the steady-state ``samples_per_s`` windows of
the run's ``history.jsonl`` (the first ``--warmup-windows`` windows dropped). Bare: the same
``build_state`` + ``train_step`` in this process over batches pre-decoded with ``prepare_rows``
from the same shards, same batch size, objective and torch thread count, timed in the same
``log_every`` windows; run once before and once after the pipeline (the mean is the reference,
their spread shows how noisy the machine was). Prints ONE JSON line on stdout; Ray's own output
goes to ``<output>/run-*/pipeline.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmray.config import Config
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import TRAIN_COLUMNS, decode_spec, tokenizer_for
from vlmray.data.shards import iter_shards
from vlmray.data.synthetic import write_synthetic
from vlmray.distributed import Dist
from vlmray.recipes import recipe
from vlmray.train.loop import train_step
from vlmray.train.state import build_state


def build_config(args: argparse.Namespace, data_dir: str) -> Config:
    return recipe(args.recipe, **{
        "data.source": data_dir, "train.steps": args.steps, "train.batch_size": args.batch_size,
        "train.log_every": args.log_every, "train.checkpoint_every": 0, "eval.every": 0,
        "train.torch_threads": args.torch_threads,
        "data.synthetic.num_train": args.num_train, "data.synthetic.num_eval": 200})


def worker_threads(cfg: Config, workers_per_node: int = 1) -> int:
    """The intra-op thread count ``vlmray.train.loop._set_threads`` gives a CPU worker."""
    return cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers_per_node)


# --- the bare loop -----------------------------------------------------------------------------


def load_batches(cfg: Config) -> list[dict[str, torch.Tensor]]:
    """Every full batch of accepted train rows, decoded exactly as the ingest stage does."""
    samples = list(iter_shards(os.path.join(cfg.data.source, "train")))
    rows = prepare_rows([s[schema.KEY] for s in samples], [s.get(schema.IMAGE) for s in samples],
                        [s.get(schema.TEXT) for s in samples], [s.get(schema.META) for s in samples],
                        decode_spec(cfg.data), tokenizer_for(cfg.data))
    keep = rows[schema.REJECT_REASON] == ""
    cols = {k: torch.as_tensor(rows[k][keep]) for k in TRAIN_COLUMNS}
    bs = cfg.train.batch_size
    return [{k: v[i:i + bs] for k, v in cols.items()} for i in range(0, int(keep.sum()) - bs + 1, bs)]


def bare_windows(cfg: Config, batches: list[dict[str, torch.Tensor]], threads: int) -> list[float]:
    """samples/s of each ``log_every``-step window of a plain loop (no Ray, no data wait)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state, dist = build_state(cfg, device=torch.device("cpu")), Dist()
        windows, t0, every = [], time.perf_counter(), cfg.train.log_every
        for step in range(1, cfg.train.steps + 1):
            train_step(state, batches[(step - 1) % len(batches)], dist)
            if step % every == 0 or step == cfg.train.steps:
                t1 = time.perf_counter()
                windows.append(((step - 1) % every + 1) * cfg.train.batch_size / (t1 - t0))
                t0 = t1
        return windows
    finally:
        torch.set_num_threads(previous)


# --- the pipeline, on a private Ray head -------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _worker_port_range(width: int = 64) -> tuple[int, int]:
    for base in range(31000, 60000, width + 11):
        with contextlib.ExitStack() as stack:
            try:
                for p in range(base, base + width):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", p))
                return base, base + width - 1
            except OSError:
                continue
    raise RuntimeError("no free worker port range")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


@contextlib.contextmanager
def local_head(num_cpus: int, log: Path) -> Iterator[str]:
    """A loopback-only head (free ports, short temp dir) in its own session; yields its GCS
    address. On exit SIGTERMs that head and SIGKILLs, by pid, any process of its session left."""
    temp_dir = tempfile.mkdtemp(prefix="vrb", dir="/tmp")
    gcs, *p = _free_ports(9)
    lo, hi = _worker_port_range()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=false",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", f"--port={gcs}",
           f"--dashboard-port={p[0]}", f"--dashboard-agent-listen-port={p[1]}",
           f"--dashboard-agent-grpc-port={p[2]}", f"--runtime-env-agent-port={p[3]}",
           f"--metrics-export-port={p[4]}", f"--object-manager-port={p[5]}",
           f"--node-manager-port={p[6]}", f"--ray-client-server-port={p[7]}",
           f"--min-worker-port={lo}", f"--max-worker-port={hi}", "--disable-usage-stats"]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield f"127.0.0.1:{gcs}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        deadline = time.monotonic() + 15
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@contextlib.contextmanager
def _redirect_fds(log: Path) -> Iterator[None]:
    """Sends this process's stdout and stderr (fd level: Ray's log threads too) to ``log``."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def run_pipeline(cfg: Config, run_dir: Path) -> tuple[list[dict], float]:
    """``vlmray.run`` against a private head; returns (history rows, wall seconds)."""
    import ray

    import vlmray
    from vlmray.train.history import read_history

    run_dir.mkdir(parents=True)
    log = run_dir / "pipeline.log"
    with local_head(num_cpus=os.cpu_count() or 1, log=log) as address, _redirect_fds(log):
        os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
        t0 = time.perf_counter()
        try:
            vlmray.run(cfg, str(run_dir / "run"))
        finally:
            wall = time.perf_counter() - t0
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS")
    return read_history(str(run_dir / "run")), wall


# --- report ----------------------------------------------------------------------------------


def _steady(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values[-1:]


def summarise(cfg: Config, args: argparse.Namespace, history: list[dict], pipeline_wall: float,
              bare: list[list[float]], bare_wall: list[float]) -> dict:
    rows = _steady([r for r in history if "samples_per_s" in r], args.warmup_windows)
    pipe = statistics.median(r["samples_per_s"] for r in rows)
    bare_runs = [statistics.median(_steady(w, args.warmup_windows)) for w in bare]
    bare_sps = statistics.mean(bare_runs)
    bs = cfg.train.batch_size
    return {
        "benchmark": "train_throughput",
        "config": {"recipe": cfg.recipe, "steps": cfg.train.steps, "batch_size": bs,
                   "log_every": cfg.train.log_every, "warmup_windows": args.warmup_windows,
                   "model": {"vision": cfg.model.vision, **cfg.model.vision_kwargs,
                             "text_layers": cfg.model.text.get("num_hidden_layers"),
                             "embed_dim": cfg.model.embed_dim, "image_size": cfg.data.image_size},
                   "objectives": [o.name for o in cfg.objectives], "cpus": os.cpu_count()},
        "pipeline": {"samples_per_s": round(pipe, 2), "step_ms": round(1e3 * bs / pipe, 1),
                     "data_wait_frac_median": round(statistics.median(
                         r["data_wait_frac"] for r in rows), 4),
                     "windows_used": len(rows), "torch_threads": worker_threads(cfg),
                     "wall_s": round(pipeline_wall, 1)},
        "bare": {"samples_per_s": round(bare_sps, 2), "step_ms": round(1e3 * bs / bare_sps, 1),
                 "before_after_samples_per_s": [round(x, 2) for x in bare_runs],
                 "torch_threads": worker_threads(cfg),
                 "wall_s": [round(w, 1) for w in bare_wall]},
        "ratio": round(pipe / bare_sps, 3),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimiser steps in each loop")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default="runs/bench", help="data and runs go here")
    parser.add_argument("--recipe", default="clip_tiny")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timing window")
    parser.add_argument("--warmup-windows", type=int, default=2, help="windows dropped")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="train.torch_threads for both loops (0: the worker's default rule)")
    parser.add_argument("--num-train", type=int, default=4000, help="synthetic train rows")
    args = parser.parse_args(argv)

    out = Path(args.output).resolve()
    cfg = build_config(args, str(out / "data"))
    if not (out / "data" / "dataset.json").exists():
        write_synthetic(cfg.data.synthetic, str(out / "data"))
    batches = load_batches(cfg)
    threads = worker_threads(cfg)
    bare, bare_wall = [], []
    for phase in ("before", "pipeline", "after"):
        print(f"[bench] {phase} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if phase == "pipeline":
            history, pipeline_wall = run_pipeline(cfg, out / f"run-{time.strftime('%Y%m%d-%H%M%S')}")
            continue
        bare.append(bare_windows(cfg, batches, threads))
        bare_wall.append(time.perf_counter() - t0)
    print(json.dumps(summarise(cfg, args, history, pipeline_wall, bare, bare_wall)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
