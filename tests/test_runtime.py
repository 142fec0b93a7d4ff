"""``init_ray`` without RAY_ADDRESS starts a local Ray that only this machine can reach.

A fresh Python process (no RAY_ADDRESS, its own RAY_TMPDIR, ``RAY_AUTH_MODE=disabled``) calls
``init_ray`` and reports Ray's node IP, the GCS and raylet addresses, and every TCP socket
that it or a process it started listens on.

``import vlmray`` sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine switch) by
default, but Ray reads it only when Ray is first imported, and never over a value already in
the environment. The probe has both: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` set and ``ray``
imported before vlmray. Before the fix GCS, raylet, workers and agents then listened on 0.0.0.0
with the machine's routable IP as node IP (and with the variable unset but ``ray`` imported
first, the node did not start at all: the driver and the processes it spawned disagreed on the
node IP).

    pytest tests/test_runtime.py -q        # about 10-20 s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

PROBE = r"""
import json, os, time
import ray
import psutil  # Ray ships it (ray/thirdparty_files)
from vlmray.runtime import init_ray

init_ray()
try:
    report = {"node_ip": ray.util.get_node_ip_address(),
              "gcs": ray.get_runtime_context().gcs_address,
              "raylet": [n["NodeManagerAddress"] for n in ray.nodes()],
              "env_after": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    time.sleep(1.0)  # the agents open their ports a moment after ray.init returns
    me = psutil.Process()
    listening = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except psutil.Error:
            continue
        listening += [[name, c.laddr.ip, c.laddr.port] for c in conns
                      if c.status == psutil.CONN_LISTEN]
    report["listening"] = listening
finally:
    ray.shutdown()
print("REPORT " + json.dumps(report))
"""


def _local_ray_report() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k == "RAY_AUTH_MODE"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    with tempfile.TemporaryDirectory(prefix="vrt-", dir="/tmp") as tmp:
        env["RAY_TMPDIR"] = tmp
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, text=True,
                              capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def test_local_cluster_listens_on_loopback_only() -> None:
    report = _local_ray_report()
    assert report["node_ip"] == "127.0.0.1", report
    assert report["gcs"].rsplit(":", 1)[0] == "127.0.0.1", report
    assert report["raylet"] == ["127.0.0.1"], report
    names = {name for name, _, _ in report["listening"]}
    assert {"gcs_server", "raylet"} <= names, report["listening"]
    exposed = [entry for entry in report["listening"] if entry[1] not in LOOPBACK]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert report["env_after"] == "1"  # the caller's setting is put back once the node is up
