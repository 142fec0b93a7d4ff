"""Fault tolerance on a real local Ray: a training worker dies mid-run and Ray Train restores it
from the last checkpoint; a driver killed mid-run is continued by ``--resume``.

1. ``vlmray.run`` with ``train.max_failures=1`` on this module's own Ray, whose job runtime env
   sets ``VLMRAY_FAULT_AT_STEP`` (the test-only hook in vlmray/train/loop.py): rank 0 calls
   ``os._exit(1)`` once, right after logging step 6 (checkpoints every 4 steps). The run must
   restore step 4 and finish with every step logged once and no sample counted twice.
2. ``python jobs/pretrain.py`` in its own session (it starts its own local Ray); once a
   checkpoint at step >= 8 exists the whole process group is SIGKILLed; the Ray it started
   must die with it (stragglers are killed by pid, only they). ``--resume`` then continues from
   that checkpoint instead of step 0.

    python -m pytest tests/train/test_fault_tolerance.py -q -s   # ~2-3.5 min on 2 shared cores
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import vlmray
from tests.plugins.ray_head import kill_pids, node_env, pids_mentioning, session_members
from tests.train.test_pipeline_ray import TINY_MODEL
from vlmray.train.checkpoint import find_latest
from vlmray.train.history import read_events, read_history
from vlmray.train.loop import FAULT_AT_STEP_ENV

REPO = Path(__file__).resolve().parents[2]
FAULT_AT = 6
# Ray Train's controller polls workers (health + reports) every 2 s by default and a worker's
# report waits for the previous one to be polled; polling faster keeps these short runs short.
POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
SMALL = {
    "train.batch_size": 32, "train.log_every": 2, "train.checkpoint_every": 4,
    "eval.every": 0, "eval.max_samples": 60, "data.synthetic.num_train": 400,
    "data.synthetic.num_eval": 60, "data.synthetic.shard_size": 200,
    **TINY_MODEL,
}


def _raw_steps(run_dir: str | Path) -> list[int]:
    """Steps in history.jsonl as written (not deduplicated)."""
    return [r["step"] for r in read_history(str(run_dir))]


# --- 1. a worker dies; Ray Train restores it -------------------------------------------------


@pytest.fixture(scope="module")
def ray_with_fault() -> Iterator[None]:
    """This module's own local Ray; its job runtime env arms the fault hook in every worker."""
    ray.shutdown()  # never share another module's connection
    tmp = tempfile.mkdtemp(prefix="vf-", dir="/tmp")  # short: socket paths < 100 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {FAULT_AT_STEP_ENV: str(FAULT_AT)}})
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _fault_timings(m: dict) -> dict[str, float]:
    """Seconds from the injected fault to: the restarted worker group's start (failure
    detected + workers rescheduled + checkpoint loaded), its first logged step, the run's end."""
    fault = next(e for e in m["attempts"] if e["event"] == "fault")
    restart = [e for e in m["attempts"] if e["event"] == "start"][-1]
    return {"restart_s": restart["time"] - fault["time"],
            "first_step_s": restart["first_step_time"] - fault["time"],
            "finish_s": m["finished_at"] - fault["time"]}


def test_worker_failure_restores_from_last_checkpoint(ray_with_fault: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in POLL.items():
        monkeypatch.setenv(name, value)   # Ray Train passes it on to its controller and workers
    cfg = vlmray.recipe("clip_tiny", **SMALL, **{"train.steps": 16, "train.max_failures": 1})
    t0 = time.time()
    result = vlmray.run(cfg, output=str(tmp_path / "run"))
    m = result.metrics

    assert m["steps"] == 16 and m["samples_seen"] == 16 * 32        # no batch counted twice
    assert _raw_steps(result.run_dir) == list(range(2, 17, 2))      # raw file: each step once
    events = read_events(result.run_dir)
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0), ("fault", FAULT_AT), ("start", 4)]          # restored checkpoint 4
    # "ray": Ray Train's own record; "storage": the newest on the run's storage, when Ray lost
    # the step-4 report (a worker dying right after reporting can race the controller's poll)
    assert events[0]["source"] == "fresh" and events[2]["source"] in ("ray", "storage")
    assert m["restarts"] == 1
    assert [{k: v for k, v in a.items() if not k.startswith("first_step")}
            for a in m["attempts"]] == events
    assert (m["attempts"][0]["first_step"], m["attempts"][2]["first_step"]) == (2, 6)
    fault_time = events[1]["time"]
    rows = {r["step"]: r for r in read_history(result.run_dir)}
    # step 6 was logged before the fault, dropped on restore (past checkpoint 4), logged again
    assert rows[2]["time"] < rows[4]["time"] < fault_time < rows[6]["time"]
    assert Path(result.checkpoint, "state.pt").is_file()
    assert json.loads(Path(result.checkpoint, "progress.json").read_text())["step"] == 16

    timings = _fault_timings(m)
    print(f"\nfault at step {FAULT_AT}, {fault_time - t0:.1f}s into the run; restarted "
          f"+{timings['restart_s']:.1f}s (restored step 4 from {events[2]['source']}); first "
          f"step logged after restore +{timings['first_step_s']:.1f}s; finished "
          f"+{timings['finish_s']:.1f}s (run wall {m['wall_s']:.1f}s)")
    assert 0 < timings["restart_s"] < timings["first_step_s"] < timings["finish_s"]
    saved = json.loads(Path(result.run_dir, "metrics.json").read_text())
    assert saved["restarts"] == 1 and saved["attempts"] == m["attempts"]


# --- 2. the driver dies; --resume continues ----------------------------------------------------


def _pretrain(run_dir: Path, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    args = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in SMALL.items()]
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "jobs/pretrain.py", "--output", str(run_dir), "--train.steps=12",
             *args, *extra], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True)


def _latest_step(run_dir: Path) -> int:
    latest = find_latest(run_dir / "ray")
    return json.loads(Path(latest, "progress.json").read_text())["step"] if latest else 0


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, log: Path, step: int,
                         timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _latest_step(run_dir) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint at step >= {step} (driver rc {proc.poll()}):\n"
                        f"{log.read_text()[-4000:]}")
        time.sleep(0.3)


def _kill_driver(proc: subprocess.Popen, ray_tmp: str, grace: float = 30) -> list[str]:
    """SIGKILLs the driver's process group, waits up to ``grace`` s for everything it started
    (its session, and anything naming its Ray temp dir) to exit, then SIGKILLs, by pid, what is
    left. Returns the leftovers' command names (raylet/gcs_server there means Ray did not
    fate-share with its driver)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + grace

    def left() -> list[int]:
        return sorted(set(session_members(proc.pid)) | set(pids_mentioning(ray_tmp)))

    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = left()
    names = []
    for pid in leftovers:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass
    kill_pids(leftovers)
    return names


def test_killed_driver_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="vd", dir="/tmp")   # the drivers' own local Ray
    env = {**node_env(ray_tmp), **POLL}
    env.pop(FAULT_AT_STEP_ENV, None)
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    drivers = [_pretrain(run_dir, env, log)]
    try:
        _wait_for_checkpoint(drivers[0], run_dir, log, step=8)
        killed_at = time.time()
        leftovers = _kill_driver(drivers[0], ray_tmp)
        cleanup_s = time.time() - killed_at
        assert not [n for n in leftovers if n.startswith(("raylet", "gcs_server"))], leftovers
        ckpt_step = _latest_step(run_dir)
        before = read_history(str(run_dir))
        assert ckpt_step >= 8 and max(r["step"] for r in before) >= ckpt_step

        drivers.append(_pretrain(run_dir, env, log, "--resume"))
        assert drivers[1].wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        for proc in drivers:          # on a failure: stop what is still running (ours only)
            if proc.poll() is None:
                _kill_driver(proc, ray_tmp, grace=10)
        kill_pids(pids_mentioning(ray_tmp))   # anything else naming our drivers' temp dir
        shutil.rmtree(ray_tmp, ignore_errors=True)

    starts = [e for e in read_events(str(run_dir)) if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, ckpt_step]           # continued, not from 0
    # "resume": the checkpoint --resume found; "ray": Ray Train's own record of the same run
    # (it restores a re-run of the same storage path itself when its record is that recent)
    assert starts[0]["source"] == "fresh" and starts[1]["source"] in ("resume", "ray")
    assert _raw_steps(run_dir) == list(range(2, 13, 2))           # continued; each step once
    rows = {r["step"]: r for r in read_history(str(run_dir))}
    assert all(rows[s]["time"] < killed_at for s in rows if s <= ckpt_step)   # kept
    assert all(rows[s]["time"] > killed_at for s in rows if s > ckpt_step)    # trained again
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == 12 and m["samples_seen"] == 12 * 32 and m["restarts"] == 0
    print(f"\ndriver killed with checkpoint {ckpt_step} on disk (history reached step "
          f"{max(r['step'] for r in before)}); its Ray gone {cleanup_s:.1f}s after the kill "
          f"(leftovers killed: {leftovers or 'none'}); --resume restored step "
          f"{starts[-1]['step']} ({starts[-1]['source']})")
