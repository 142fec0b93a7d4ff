"""End to end through the Ray Jobs API: ``ray job submit ... -- python jobs/pretrain.py``.

A module-scoped fixture starts a real single-node head (``ray start --head --block`` in its own
session, loopback only, free ports, a short ``--temp-dir``) with the dashboard's job server;
each test submits ``jobs/pretrain.py`` with the repository as the working dir, exactly as the
README tells users to, and reads the result back with ``ray job status`` / ``ray job logs``.
Teardown stops only that head and checks that every process it started is gone.

    python -m pytest tests/test_job_submit.py -v        # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
RUNTIME_ENV = json.dumps({"excludes": [".venv", "runs", ".git"]})
METRIC_KEYS = ("zero_shot_top1", "zero_shot_chance", "retrieval_i2t_r1", "retrieval_t2i_r1",
               "samples_per_s", "wall_s", "rows_in", "rows_rejected")


@dataclass
class Head:
    dashboard: str      # http://127.0.0.1:<port>, the job server's address
    env: dict[str, str]  # environment for the ray CLI clients
    log: Path           # the head's own stdout/stderr


# --- ports and processes ---------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
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


def _free_port_range(width: int, exclude: set[int]) -> tuple[int, int]:
    """A run of ``width`` consecutive free ports for Ray's worker processes."""
    for base in range(30000, 60000 - width, width + 7):
        ports = range(base, base + width)
        if exclude.intersection(ports):
            continue
        try:
            socks = []
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


def _session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (Ray's workers take their own process group but keep
    the session of the ``ray start`` that spawned them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _stop_head(proc: subprocess.Popen) -> list[int]:
    """SIGTERM to our ``ray start --block`` (it shuts its node down), then SIGKILL any process of
    its session still alive, one by one. Returns the pids that had to be killed."""
    sid = proc.pid  # start_new_session=True: the head is its session's leader
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = _session_members(sid)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def _ray(head: Head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=head.env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_job_server(proc: subprocess.Popen, head: Head, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-4000:]}")
        try:
            if _ray(head, "job", "list", "--address", head.dashboard, timeout=30).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
    pytest.fail(f"job server at {head.dashboard} did not answer in {timeout}s:\n"
                f"{head.log.read_text()[-4000:]}")


def _head_command(temp_dir: str, ports: list[int], worker_range: tuple[int, int]) -> list[str]:
    (gcs, dash, agent_http, agent_grpc, runtime_env, metrics, obj_mgr, node_mgr, client) = ports
    return [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={300 * 1024**2}",
        f"--temp-dir={temp_dir}", f"--port={gcs}", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--object-manager-port={obj_mgr}", f"--node-manager-port={node_mgr}",
        f"--ray-client-server-port={client}",
        f"--min-worker-port={worker_range[0]}", f"--max-worker-port={worker_range[1]}",
    ]


def _head_env(temp_dir: str) -> dict[str, str]:
    """The environment of the head, inherited by the job driver and every worker: no auth on
    loopback, no drain delay at shutdown, caches and temp files inside ``temp_dir``."""
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
    return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A real head with the job server, on loopback; stopped (only it) at module end."""
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: socket paths < 100 chars
    ports = _free_ports(9)
    worker_range = _free_port_range(64, set(ports))
    env = _head_env(temp_dir)
    head = Head(dashboard=f"http://127.0.0.1:{ports[1]}", env=env,
                log=Path(temp_dir) / "head.log")
    with open(head.log, "w") as log:
        proc = subprocess.Popen(_head_command(temp_dir, ports, worker_range), env=env,
                                cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_job_server(proc, head)
        yield head
    finally:
        killed = _stop_head(proc)
        time.sleep(1)
        alive = _session_members(proc.pid)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        assert not alive, f"processes of the test's Ray head survived SIGKILL: {alive}"
        if killed:
            print(f"ray head teardown: SIGKILLed stragglers {killed}", file=sys.stderr)


# --- jobs ------------------------------------------------------------------------------------


def _submit(head: Head, *job_args: str, timeout: float = 240) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit`` (waits, tailing logs); returns (submission id, the finished CLI)."""
    job_id = f"vlmray-test-{uuid.uuid4().hex[:8]}"
    done = _ray(head, "job", "submit", "--address", head.dashboard, "--submission-id", job_id,
                "--working-dir", str(REPO), "--runtime-env-json", RUNTIME_ENV,
                "--", "python", "jobs/pretrain.py", *job_args, timeout=timeout)
    return job_id, done


def _status(head: Head, job_id: str) -> str:
    """The job's status word (SUCCEEDED, FAILED, ...) as ``ray job status`` prints it."""
    out = _ray(head, "job", "status", "--log-style", "record", "--address", head.dashboard, job_id)
    text = out.stdout + out.stderr
    if m := re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|stopped)", text):
        return m.group(1).upper()
    if m := re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text):
        return m.group(1).rsplit(".", 1)[-1].upper()
    raise AssertionError(f"cannot read a status from `ray job status`:\n{text}")


def _logs(head: Head, job_id: str) -> str:
    out = _ray(head, "job", "logs", "--address", head.dashboard, job_id)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_pretrain_job_succeeds_and_writes_its_run(ray_head: Head, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id, done = _submit(
        ray_head, "--output", str(run_dir), "--train.steps", "6", "--train.log_every", "3",
        "--train.checkpoint_every", "6", "--eval.every", "0",
        "--data.synthetic.num_train", "400", "--data.synthetic.num_eval", "60",
        "--train.batch_size", "32")
    logs = _logs(ray_head, job_id)
    assert done.returncode == 0, f"submit exited {done.returncode}:\n{logs[-6000:]}"
    assert _status(ray_head, job_id) == "SUCCEEDED"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert isinstance(metrics.get(key), (int, float)), f"metrics.json: {key}={metrics.get(key)!r}"
    assert metrics["rows_in"] == 400
    assert metrics["rows_in"] == metrics["rows_accepted"] + metrics["rows_rejected"]
    assert 0 < metrics["zero_shot_chance"] < 1 and metrics["samples_per_s"] > 0
    assert metrics["steps"] == 6
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = Path(metrics["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.is_relative_to(run_dir) and any(checkpoint.iterdir())

    for step in (3, 6):
        assert re.search(rf"\[vlmray\] step {step} epoch \d+ loss=", logs), \
            f"no progress line for step {step} in `ray job logs`:\n{logs[-6000:]}"
    assert "[vlmray] done in" in logs


def test_unknown_field_fails_the_job_naming_valid_fields(ray_head: Head) -> None:
    job_id, done = _submit(ray_head, "--train.stepz", "3", timeout=120)
    assert done.returncode != 0
    assert _status(ray_head, job_id) == "FAILED"
    logs = _logs(ray_head, job_id)
    assert "unknown config field 'train.stepz'" in logs, logs[-3000:]
    assert "did you mean 'train.steps'" in logs
    valid = logs.split("valid:", 1)[-1]
    assert "valid:" in logs and all(f in valid for f in ("train.steps", "train.batch_size", "eval.every"))
