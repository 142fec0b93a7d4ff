"""The GPU session's prepared script runs here first: 2 CPU processes over gloo via torchrun.

    pytest tests/distributed/test_device_check.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_runs_under_torchrun_and_reports_exact_gathers() -> None:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "benchmarks" / "device_check.py"), "--steps", "2", "--batch", "8"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    names = {(r["objective"], r.get("exchange", "")) for r in report["exact"]}
    assert {("clip", ""), ("siglip", "ring"), ("filip", ""), ("unicl", ""), ("declip_mv", ""),
            ("pyramidclip", ""), ("nlip", "")} <= names
    for r in report["exact"]:                       # float32: W workers == one process
        assert r["loss_diff"] < 1e-5 and r["grad_max_diff"] < 1e-5, r
    assert [s["recipe"] for s in report["step"]] == ["clip_tiny", "siglip_tiny"]
    assert all(s["finite"] and s["samples_per_s"] > 0 for s in report["step"])
