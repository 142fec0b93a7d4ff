"""Real Ray nodes for tests: ``ray start --block`` subprocesses on loopback, stopped one by one.

Each node runs in its own session (``start_new_session=True``), so everything it spawned
(raylet, GCS, agents, workers: they change process group but keep the session) can be found
and, at teardown, stopped without touching any other Ray on the machine. Never ``ray stop``.

    head = start_head(num_cpus=1, resources={"node_a": 1}, dashboard=False)
    node = start_worker_node(head, num_cpus=1, resources={"node_b": 1})
    ...
    stop_nodes(head, node)       # the joined node first, then the head; removes its temp dir

Fixture:
    ray_head (module) -> Head    a single-node head with the dashboard's job server
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Head", "Node", "free_ports", "kill_pids", "node_env", "pids_mentioning", "ray_cli",
           "ray_head", "session_members", "start_head", "start_worker_node", "stop_nodes",
           "stop_session", "wait_for_job_server"]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
PORTS_PER_NODE = 9  # gcs/dashboard/client (head only) and each node's own listeners
WORKER_PORTS = 64


@dataclass
class Node:
    proc: subprocess.Popen  # our ``ray start --block``: its session holds the node's processes
    log: Path               # its stdout/stderr


@dataclass
class Head(Node):
    address: str        # 127.0.0.1:<gcs port>, for ray.init(address=...) and joining nodes
    dashboard: str      # http://127.0.0.1:<port>, the job server's address ("" without one)
    env: dict[str, str]  # environment for the ray CLI clients and every node's processes
    temp_dir: str       # the cluster's short --temp-dir (socket paths < 100 chars)
    worker_ports: tuple[int, int]  # the head's worker-port range (joining nodes avoid it)


# --- ports and processes ---------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (held open together, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int, exclude: set[int]) -> tuple[int, int]:
    """A run of ``width`` consecutive free ports for Ray's worker processes."""
    for base in range(30000, 60000 - width, width + 7):
        ports = range(base, base + width)
        if exclude.intersection(ports):
            continue
        socks = []
        try:
            for p in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base, base + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for Ray workers")


def _proc_stat(pid: str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after "pid (comm)": state ppid pgrp session ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _proc_stat(entry)) and int(fields[3]) == sid \
                and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (e.g. a cluster's temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and (fields := _proc_stat(entry)) and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid (already gone is fine)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_session(proc: subprocess.Popen, *, sig: int = signal.SIGTERM,
                 grace: float = 15) -> list[int]:
    """Sends ``sig`` to ``proc`` (a session leader we started), waits for it, then up to
    ``grace`` s for the rest of its session to exit, and SIGKILLs, one by one, any process of
    that session still alive. Returns the pids that had to be killed."""
    sid = proc.pid
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + grace
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = session_members(sid)
    kill_pids(leftovers)
    return leftovers


# --- nodes -----------------------------------------------------------------------------------


def node_env(temp_dir: str, *, repo_on_path: bool = False) -> dict[str, str]:
    """The environment of every node, inherited by job drivers and workers: no auth on loopback,
    no drain delay at shutdown, caches and temp files inside ``temp_dir``; with ``repo_on_path``
    the repository on ``PYTHONPATH`` (so workers can import functions of test modules)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    cache = os.path.join(temp_dir, "cache")
    env.update(
        RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=temp_dir,
        RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        TMPDIR=temp_dir, XDG_CACHE_HOME=cache, HF_HOME=os.path.join(cache, "hf"),
        TORCH_HOME=os.path.join(cache, "torch"), MPLCONFIGDIR=os.path.join(cache, "mpl"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    if repo_on_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _node_flags(ports: list[int], worker_range: tuple[int, int], num_cpus: float,
                resources: dict[str, float] | None, object_store_mb: int) -> list[str]:
    """The flags every node takes: its own listeners on loopback, CPUs and custom resources."""
    agent_http, agent_grpc, runtime_env, metrics, obj_mgr, node_mgr = ports
    return [
        "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources or {})}",
        f"--object-store-memory={object_store_mb * 1024**2}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--object-manager-port={obj_mgr}", f"--node-manager-port={node_mgr}",
        f"--min-worker-port={worker_range[0]}", f"--max-worker-port={worker_range[1]}",
    ]


# The `ray` CLI (``ray.scripts.scripts.main``) with one guard lifted in this process only.
# With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (kept for every process: Ray then resolves
# 127.0.0.1 to itself) `ray start --address` refuses to join a cluster; with =1 it would rewrite
# 127.0.0.1 to the machine's external IP, where the loopback-bound GCS does not listen. So the
# CLI gets a copy of ray_constants saying "clusters enabled" while address resolution keeps
# reading the real one.
_JOIN_ON_LOOPBACK = """
import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as cli
joinable = types.ModuleType(rc.__name__)
joinable.__dict__.update(vars(rc))
joinable.ENABLE_RAY_CLUSTER = True
cli.ray_constants = joinable
sys.exit(cli.main())
"""


def _launch(cmd: list[str], env: dict[str, str], log: Path, cwd: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_head(*, num_cpus: float = 2, resources: dict[str, float] | None = None,
               dashboard: bool = True, object_store_mb: int = 300,
               repo_on_path: bool = False) -> Head:
    """Starts (does not wait for) a head on loopback with free ports and a fresh short temp dir;
    ``repo_on_path``: see :func:`node_env`."""
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    ports = free_ports(PORTS_PER_NODE)
    gcs, dash, client, *own = ports
    worker_range = free_port_range(WORKER_PORTS, set(ports))
    cmd = [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--include-dashboard={str(dashboard).lower()}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
           *_node_flags(own, worker_range, num_cpus, resources, object_store_mb)]
    env, log = node_env(temp_dir, repo_on_path=repo_on_path), Path(temp_dir) / "head.log"
    return Head(proc=_launch(cmd, env, log, temp_dir), log=log, address=f"127.0.0.1:{gcs}",
                dashboard=f"http://127.0.0.1:{dash}" if dashboard else "", env=env,
                temp_dir=temp_dir, worker_ports=worker_range)


def start_worker_node(head: Head, *, num_cpus: float = 1, resources: dict[str, float] | None = None,
                      object_store_mb: int = 100) -> Node:
    """Starts (does not wait for) a second node on this machine joining ``head``; it shares the
    head's temp dir (its session directory comes from the GCS)."""
    ports = free_ports(PORTS_PER_NODE - 3)
    lo, hi = head.worker_ports
    worker_range = free_port_range(WORKER_PORTS, set(ports) | set(range(lo, hi + 1)))
    cmd = [sys.executable, "-c", _JOIN_ON_LOOPBACK, "start", f"--address={head.address}",
           *_node_flags(ports, worker_range, num_cpus, resources, object_store_mb)]
    log = Path(head.temp_dir) / f"node-{ports[0]}.log"
    return Node(proc=_launch(cmd, head.env, log, head.temp_dir), log=log)


def stop_nodes(head: Head, *nodes: Node) -> list[int]:
    """Stops the joined ``nodes`` and then ``head`` (only those: SIGTERM, then SIGKILL of their
    sessions' stragglers), removes the temp dir and asserts none of their processes survived.
    Returns the pids that had to be SIGKILLed."""
    killed = []
    for node in (*nodes, head):
        killed += stop_session(node.proc)
    time.sleep(1)
    alive = [p for node in (*nodes, head) for p in session_members(node.proc.pid)]
    subprocess.run(["rm", "-rf", head.temp_dir], check=False)
    assert not alive, f"processes of the test's Ray nodes survived SIGKILL: {alive}"
    if killed:
        print(f"ray teardown: SIGKILLed stragglers {killed}", file=sys.stderr)
    return killed


def ray_cli(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``ray <args>`` as a client of ``head`` (its environment, the repository as cwd)."""
    return subprocess.run([RAY, *args], env=head.env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for_job_server(head: Head, timeout: float = 120) -> None:
    """Waits until ``ray job list`` answers at the head's dashboard (fails the test if not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"ray start exited with {head.proc.returncode}:\n"
                        f"{head.log.read_text()[-4000:]}")
        try:
            listed = ray_cli(head, "job", "list", "--address", head.dashboard, timeout=30)
            if listed.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
    pytest.fail(f"job server at {head.dashboard} did not answer in {timeout}s:\n"
                f"{head.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A real single-node head (2 CPUs) with the job server, on loopback; only it is stopped at
    module end."""
    head = start_head(num_cpus=2, dashboard=True)
    try:
        wait_for_job_server(head)
        yield head
    finally:
        stop_nodes(head)
