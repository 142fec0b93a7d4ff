"""Training throughput: the full Ray pipeline against a bare PyTorch loop on the same model.

    python benchmarks/train_throughput.py --steps 120 --batch-size 128 --output runs/bench
    python benchmarks/train_throughput.py --quiet-wait 300     # on a shared machine

Pipeline: ``vlmray.run`` on a private loopback Ray head (Ray Data ingest -> ``iter_torch_batches``
-> Ray Train ``TorchTrainer`` step), measured from the steady-state ``samples_per_s`` windows of
the run's ``history.jsonl`` (the first ``--warmup-windows`` dropped, median of the rest). Bare: the
same ``build_state`` + ``train_step`` in this process over batches pre-decoded with
``prepare_rows`` from the same shards: same batch size, objective and torch thread count (the
worker's rule), timed in the same ``log_every`` windows. The bare loop runs before and after the
pipeline with no Ray up (the faster is the reference: other tenants only slow a run down) and
once more while the pipeline's node is still up but idle. Each phase also records how many cores
OTHER processes on the machine kept busy (``phases.*.other_tenants_cores``): a ratio measured
while that is well above 0 is contention, not the pipeline.

Prints ONE JSON line on stdout; Ray's output goes to ``<output>/run-*/pipeline.log`` and the
per-window numbers to ``<output>/run-*/bench.json``.
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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read once, when ray is imported

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
    rows = prepare_rows(*([s.get(col) for s in samples]
                          for col in (schema.KEY, schema.IMAGE, schema.TEXT, schema.META)),
                        decode_spec(cfg.data), tokenizer_for(cfg.data))
    keep = rows[schema.REJECT_REASON] == ""
    cols = {k: torch.as_tensor(rows[k][keep]) for k in TRAIN_COLUMNS}
    bs = cfg.train.batch_size
    starts = range(0, int(keep.sum()) - bs + 1, bs)
    return [{k: v[i:i + bs] for k, v in cols.items()} for i in starts]


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


def _proc_stat(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after ``pid (comm)``: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fields = _proc_stat(entry)
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


class SessionCpu:
    """CPU seconds used by the processes of session ``sid`` (our Ray node), sampled every
    ``interval`` s by a thread so workers that exit in between are still counted."""

    def __init__(self, sid: int, interval: float = 0.25) -> None:
        self.sid, self.interval, self.seen = sid, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in _session_pids(self.sid):
            with contextlib.suppress(OSError):
                cpu = sum(int(x) for x in _proc_stat(pid)[11:13]) / os.sysconf("SC_CLK_TCK")
                self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def total(self) -> float:
        self._sample()
        return sum(self.seen.values())


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:9]]
    return (sum(t) - t[3] - t[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def wait_for_quiet(max_s: float, threshold: float = 0.2, probe_s: float = 5.0) -> float:
    """Waits (up to ``max_s``) for a ``probe_s`` spell in which other processes keep fewer than
    ``threshold`` cores busy; returns the last spell's busy cores. A shared box needs this."""
    deadline, busy = time.monotonic() + max_s, 0.0
    while True:
        b0, own0 = _machine_busy_s(), time.process_time()
        time.sleep(probe_s)
        busy = ((_machine_busy_s() - b0) - (time.process_time() - own0)) / probe_s
        if busy < threshold or time.monotonic() >= deadline:
            return busy


@contextlib.contextmanager
def cpu_meter(own_cpu_s: Callable[[], float]) -> Iterator[dict[str, float]]:
    """Times a phase and how many cores OTHER tenants of the machine kept busy meanwhile
    (machine busy time minus ``own_cpu_s``): contention that slows the phase down."""
    m: dict[str, float] = {}
    busy0, own0, t0 = _machine_busy_s(), own_cpu_s(), time.perf_counter()
    try:
        yield m
    finally:
        m["wall_s"] = time.perf_counter() - t0
        other = (_machine_busy_s() - busy0) - (own_cpu_s() - own0)
        m["other_tenants_cores"] = max(0.0, other) / m["wall_s"]


@contextlib.contextmanager
def local_head(num_cpus: int, log: Path) -> Iterator[tuple[str, int]]:
    """A loopback-only head (free ports, short temp dir) in its own session; yields (GCS
    address, session id). On exit SIGTERMs that head and SIGKILLs, by pid, any process of its
    session left: nothing else on the machine is touched."""
    gcs, *p = _free_ports(9)
    lo, hi = _worker_port_range()
    temp_dir = tempfile.mkdtemp(prefix="vrb", dir="/tmp")
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
    try:
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    except BaseException:
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        raise
    try:
        yield f"127.0.0.1:{gcs}", proc.pid
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


def run_pipeline(cfg: Config, run_dir: Path, phases: dict[str, dict[str, float]],
                 while_idle: Callable[[], list[float]]) -> tuple[list[dict], list[float]]:
    """``vlmray.run`` against a private head; then, with that node still up but idle, calls
    ``while_idle`` (the bare loop again: what an idle Ray node costs the box). Returns (history
    rows, the idle-node bare windows); fills ``phases["pipeline" | "idle_ray_node"]``."""
    import ray

    import vlmray
    from vlmray.train.history import read_history

    run_dir.mkdir(parents=True)
    log = run_dir / "pipeline.log"
    with (local_head(num_cpus=os.cpu_count() or 1, log=log) as (address, sid),
          SessionCpu(sid) as node):
        os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")

        def own() -> float:  # this process plus our Ray node
            return time.process_time() + node.total()

        try:
            with _redirect_fds(log), cpu_meter(own) as phases["pipeline"]:
                vlmray.run(cfg, str(run_dir / "run"))
            with cpu_meter(own) as phases["idle_ray_node"]:
                idle = while_idle()
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS")
    return read_history(str(run_dir / "run")), idle


# --- report ----------------------------------------------------------------------------------


def _steady(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values[-1:]


def summarise(cfg: Config, args: argparse.Namespace, history: list[dict],
              bare: dict[str, list[float]], phases: dict[str, dict[str, float]]) -> dict:
    """The reference is the FASTER of the two no-Ray bare runs: other tenants can only slow a
    run down, so the faster one is nearer the machine's true speed (timeit's rule)."""
    rows = _steady([r for r in history if "samples_per_s" in r], args.warmup_windows)
    pipe = statistics.median(r["samples_per_s"] for r in rows)
    runs = {k: statistics.median(_steady(w, args.warmup_windows)) for k, w in bare.items()}
    ref = max(runs["before"], runs["after"])
    bs, model = cfg.train.batch_size, cfg.model
    return {
        "benchmark": "train_throughput",
        "config": {"recipe": cfg.recipe, "steps": cfg.train.steps, "batch_size": bs,
                   "log_every": cfg.train.log_every, "warmup_windows": args.warmup_windows,
                   "model": {"vision": model.vision, "vision_kwargs": model.vision_kwargs,
                             "text_layers": model.text.get("num_hidden_layers"),
                             "text_width": model.text.get("hidden_size"),
                             "embed_dim": model.embed_dim, "image_size": cfg.data.image_size},
                   "objectives": [o.name for o in cfg.objectives], "cpus": os.cpu_count()},
        "pipeline": {"samples_per_s": round(pipe, 2), "step_ms": round(1e3 * bs / pipe, 1),
                     "data_wait_frac_median": round(statistics.median(
                         r["data_wait_frac"] for r in rows), 4),
                     "windows_used": len(rows), "torch_threads": worker_threads(cfg)},
        "bare": {"samples_per_s": round(ref, 2), "step_ms": round(1e3 * bs / ref, 1),
                 "samples_per_s_by_run": {k: round(v, 2) for k, v in runs.items()},
                 "torch_threads": worker_threads(cfg)},
        "ratio": round(pipe / ref, 3),
        "ratio_vs_bare_on_idle_ray_node": round(pipe / runs["idle_ray_node"], 3),
        "phases": {k: {n: round(v, 2) for n, v in m.items()} for k, m in phases.items()},
        "contended_phases": [k for k, m in phases.items() if m["other_tenants_cores"] > 0.2],
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
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each phase wait up to this many seconds for the machine to "
                             "be quiet (other processes < 0.2 cores); for shared machines")
    args = parser.parse_args(argv)

    out = Path(args.output).resolve()
    cfg = build_config(args, str(out / "data"))
    if not (out / "data" / "dataset.json").exists():
        write_synthetic(cfg.data.synthetic, str(out / "data"))
    batches, threads = load_batches(cfg), worker_threads(cfg)
    bare: dict[str, list[float]] = {}
    phases: dict[str, dict[str, float]] = {}

    def quiet() -> None:
        if args.quiet_wait > 0:
            print(f"[bench] other load {wait_for_quiet(args.quiet_wait):.2f} cores",
                  file=sys.stderr, flush=True)

    def bare_run(name: str) -> list[float]:
        quiet()
        print(f"[bench] bare loop ({name}) ...", file=sys.stderr, flush=True)
        bare[name] = bare_windows(cfg, batches, threads)
        return bare[name]

    with cpu_meter(time.process_time) as phases["before"]:
        bare_run("before")
    quiet()
    print("[bench] pipeline ...", file=sys.stderr, flush=True)
    run_dir = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    history, _ = run_pipeline(cfg, run_dir, phases, lambda: bare_run("idle_ray_node"))
    with cpu_meter(time.process_time) as phases["after"]:
        bare_run("after")
    result = summarise(cfg, args, history, bare, phases)
    (run_dir / "bench.json").write_text(json.dumps({**result, "windows": {
        "pipeline": [r["samples_per_s"] for r in history if "samples_per_s" in r], **bare}}))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
