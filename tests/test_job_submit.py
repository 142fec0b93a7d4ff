"""End to end through the Ray Jobs API: ``ray job submit ... -- python jobs/pretrain.py``.

The module-scoped ``ray_head`` fixture (tests/plugins/ray_head.py) starts a real single-node head
(``ray start --head --block`` in its own session, loopback only, free ports, a short
``--temp-dir``) with the dashboard's job server;
each test submits ``jobs/pretrain.py`` with the repository as the working dir, exactly as the
README tells users to, and reads the result back with ``ray job status`` / ``ray job logs``.
Teardown stops only that head and checks that every process it started is gone.

    python -m pytest tests/test_job_submit.py -v        # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

from tests.plugins.ray_head import Head, ray_cli

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = json.dumps({"excludes": [".venv", "runs", ".git"]})
METRIC_KEYS = ("zero_shot_top1", "zero_shot_chance", "retrieval_i2t_r1", "retrieval_t2i_r1",
               "samples_per_s", "wall_s", "rows_in", "rows_rejected")


# --- jobs ------------------------------------------------------------------------------------


def _submit(head: Head, *job_args: str, timeout: float = 240) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit`` (waits, tailing logs); returns (submission id, the finished CLI)."""
    job_id = f"vlmray-test-{uuid.uuid4().hex[:8]}"
    done = ray_cli(head, "job", "submit", "--address", head.dashboard, "--submission-id", job_id,
                   "--working-dir", str(REPO), "--runtime-env-json", RUNTIME_ENV,
                   "--", "python", "jobs/pretrain.py", *job_args, timeout=timeout)
    return job_id, done


def _status(head: Head, job_id: str) -> str:
    """The job's status word (SUCCEEDED, FAILED, ...) as ``ray job status`` prints it."""
    out = ray_cli(head, "job", "status", "--log-style", "record", "--address", head.dashboard, job_id)
    text = out.stdout + out.stderr
    if m := re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|stopped)", text):
        return m.group(1).upper()
    if m := re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text):
        return m.group(1).rsplit(".", 1)[-1].upper()
    raise AssertionError(f"cannot read a status from `ray job status`:\n{text}")


def _logs(head: Head, job_id: str) -> str:
    out = ray_cli(head, "job", "logs", "--address", head.dashboard, job_id)
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
