"""Memory of a local Ray cluster, sampled in a background thread while a job runs.

Two sources, read every ``interval_s``:

- the object store: the raylet's own store statistics (``FormatGlobalMemoryInfo``, the reply
  ``ray memory --stats-only`` prints, summed over the cluster's nodes): bytes held in the shared
  memory store (``object_store_bytes_used``), of which primary copies, bytes allocated on disk
  because the store was full (``fallback``), and the cumulative spill and restore totals. This
  is what the store itself holds, not Ray's scheduling resource ``object_store_memory`` (which
  stays at the cap whatever is stored);
- processes: ``/proc/<pid>/status`` of the driver and every process it spawned (GCS, raylet,
  agents, and the workers the raylet forked), each classed by its Ray process title
  (:func:`process_kind`). ``VmRSS`` counts the pages of the shared-memory store a worker has
  mapped; ``RssAnon`` does not (the process's own heap), so both are kept.

    sampler = MemorySampler(interval_s=0.5)
    sampler.start()
    ...                                  # the job
    report = sampler.stop()              # peaks, spill totals, peak RSS per kind of process

Also the machine's other load: cores busy in processes outside this tree (other tenants of a
shared machine), so a slow run can be told from a contended one.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")

STORE_FIELDS = ("object_store_bytes_used", "object_store_bytes_primary_copy",
                "object_store_bytes_fallback", "num_local_objects", "spilled_bytes_total",
                "spilled_objects_total", "restored_bytes_total", "cumulative_created_bytes")
"""Fields of Ray's ``ObjectStoreStats`` that are sampled."""

# Ray process title (``ray::<task or actor>``; setproctitle) -> kind, first match wins.
_KINDS = (
    ("train_worker", re.compile(r"RayTrainWorker|TrainWorker")),
    ("train_controller", re.compile(r"TrainController|TrainTrainable|Tuner|_Inner")),
    ("data_coordinator", re.compile(r"SplitCoordinator|_StatsActor|StatsSummaryActor|"
                                    r"AutoscalingRequester|Coordinator")),
    ("data_actor", re.compile(r"MapWorker|ActorPool")),
    ("data_task", re.compile(r"Read|MapBatches|Map\(|FlatMap|Filter|Write|Project|Split|"
                             r"Repartition|Limit|Aggregate|->|_map_task|_execute_read_task")),
    ("ray_agent", re.compile(r"DashboardAgent|RuntimeEnvAgent")),
    ("idle_worker", re.compile(r"^ray::IDLE")),
)
_SYSTEM = re.compile(r"gcs_server|raylet|dashboard|log_monitor|monitor\.py|runtime_env")


def process_kind(title: str, pid: int, driver_pid: int) -> str:
    """The kind of a process of the cluster from its title: ``driver``, ``ray_system`` (GCS,
    raylet, dashboard, monitors), ``train_worker``, ``train_controller``, ``data_coordinator``
    (Ray Data's split coordinator and stats actors), ``data_actor`` (actor-pool map stages),
    ``data_task`` (read / map tasks), ``ray_agent``, ``idle_worker``, else ``actor:<Name>``
    for another ``ray::`` process (e.g. ``actor:StreamTally``) or ``other``."""
    if pid == driver_pid:
        return "driver"
    if title.startswith("ray::"):
        for kind, pattern in _KINDS:
            if pattern.search(title):
                return kind
        name = re.split(r"[.(: ]", title[5:], maxsplit=1)[0]
        return f"actor:{name}" if name else "other"
    return "ray_system" if _SYSTEM.search(title) else "other"


def _status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon (bytes) and CPU seconds (utime + stime) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    out = {"cpu_s": (int(stat[11]) + int(stat[12])) / TICKS}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out if "VmRSS" in out else None


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _busy_cpu_s() -> float:
    """Seconds of CPU time the whole machine has spent busy (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


class StoreProbe:
    """The cluster's object-store statistics, read from one live raylet over gRPC (the channel is
    opened once; that raylet asks the others)."""

    def __init__(self) -> None:
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        node = next(n for n in ray.nodes() if n["Alive"])
        address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
        self.stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(address))
        self.capacity = int(sum(n["Resources"].get("object_store_memory", 0)
                                for n in ray.nodes() if n["Alive"]))

    def read(self) -> dict[str, int]:
        from ray.core.generated import node_manager_pb2

        reply = self.stub.FormatGlobalMemoryInfo(
            node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False), timeout=30)
        return {f: int(getattr(reply.store_stats, f)) for f in STORE_FIELDS}


class MemorySampler:
    """Samples the object store and the RSS of this process tree every ``interval_s`` in a
    daemon thread; :meth:`stop` returns the peaks. Call :meth:`start` after ``ray.init``."""

    def __init__(self, interval_s: float = 0.5, root_pid: int | None = None, *,
                 dump_at: float = 0.0, dump_dir: str = "", max_dumps: int = 3) -> None:
        """``dump_at`` > 0: whenever the store is at least that fraction of its capacity full
        (at most ``max_dumps`` times, 5 s apart), write ``ray memory``'s per-object table
        (what holds each object, its size and call site) to ``dump_dir/store-<t>.txt``."""
        self.interval_s = interval_s
        self.dump_at, self.dump_dir, self.max_dumps = dump_at, dump_dir, max_dumps
        self._dumps: list[float] = []
        self.root = root_pid or os.getpid()
        self.samples: list[dict[str, Any]] = []
        self.peak_proc: dict[str, dict[str, int]] = {}   # kind -> peak rss/anon of ONE process
        self.peak_kind_sum: Counter[str] = Counter()     # kind -> peak of the kind's summed rss
        self.titles: dict[str, Counter[str]] = {}        # kind -> process titles seen
        self.store_peak: dict[str, int] = {}
        self.last_store: dict[str, int] = {}
        self._cpu: dict[int, float] = {}
        self._own_cpu = self._other_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self.probe: StoreProbe | None = None
        self.t0 = 0.0
        self.errors: Counter[str] = Counter()

    def start(self) -> MemorySampler:
        self.probe = StoreProbe()
        self.t0 = time.time()
        self._cpu = {pid: s["cpu_s"] for pid in descendants(self.root)
                     if (s := _status(pid)) is not None}      # CPU before the job: baseline
        self._busy0 = _busy_cpu_s()
        self._sample()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 2)}
        try:
            store = self.probe.read() if self.probe else {}
        except Exception as e:                     # a raylet busy or going down: skip, count
            self.errors[type(e).__name__] += 1
            store = {}
        for key, value in store.items():
            self.store_peak[key] = max(self.store_peak.get(key, 0), value)
        self.last_store = store or self.last_store
        self._maybe_dump(store.get("object_store_bytes_used", 0), row["t"])
        row["store_used"] = store.get("object_store_bytes_used")
        row["primary"] = store.get("object_store_bytes_primary_copy")
        row["fallback"] = store.get("object_store_bytes_fallback")
        row["objects"] = store.get("num_local_objects")
        row["spilled"] = store.get("spilled_bytes_total")
        row.update(self._processes())
        self.samples.append(row)

    def _maybe_dump(self, used: int, t: float) -> None:
        if (self.dump_at <= 0 or not self.probe or len(self._dumps) >= self.max_dumps
                or used < self.dump_at * self.probe.capacity
                or (self._dumps and t - self._dumps[-1] < 5)):
            return
        import ray
        from ray._private.internal_api import memory_summary

        self._dumps.append(t)
        try:   # this cluster's GCS: other Ray instances may run on the machine
            text = memory_summary(address=ray.get_runtime_context().gcs_address, units="KB",
                                  num_entries=200)
        except Exception as e:
            text = f"memory_summary failed: {type(e).__name__}: {e}"
        os.makedirs(self.dump_dir or ".", exist_ok=True)
        with open(os.path.join(self.dump_dir or ".", f"store-{t:08.2f}.txt"), "w") as f:
            f.write(f"t={t} used={used}\n{text}")

    def _processes(self) -> dict[str, Any]:
        """Reads every process of the tree; updates the per-kind peaks; returns this sample's
        total RSS, its per-kind sums and the CPU cores this tree and others kept busy."""
        sums: Counter[str] = Counter()
        anon, own_cpu, seen = 0, 0.0, {}
        for pid in descendants(self.root):
            status = _status(pid)
            if status is None:
                continue
            title = _title(pid)
            kind = process_kind(title, pid, self.root)
            sums[kind] += status["VmRSS"]
            anon += status.get("RssAnon", 0)
            peak = self.peak_proc.setdefault(kind, {"rss": 0, "anon": 0})
            peak["rss"] = max(peak["rss"], status["VmRSS"])
            peak["anon"] = max(peak["anon"], status.get("RssAnon", 0))
            self.titles.setdefault(kind, Counter())[title[:80]] += 1
            own_cpu += status["cpu_s"] - self._cpu.get(pid, 0.0)
            seen[pid] = status["cpu_s"]
        self._cpu = seen
        busy = _busy_cpu_s()
        self._own_cpu += own_cpu
        self._other_cpu += max(0.0, (busy - self._busy0) - own_cpu)
        self._busy0 = busy
        for kind, total in sums.items():
            self.peak_kind_sum[kind] = max(self.peak_kind_sum[kind], total)
        return {"rss_total": sum(sums.values()), "anon_total": anon, "rss": dict(sums)}

    def stop(self) -> dict[str, Any]:
        """Stops sampling (one last sample first) and returns :meth:`report`."""
        self._stop.set()
        self._thread.join(timeout=30)
        self._sample()
        return self.report()

    def report(self) -> dict[str, Any]:
        """Peaks over the samples: object store (used, primary copies, fallback), spill and
        restore totals, RSS of the whole tree (summed VmRSS counts shared pages, the store's
        and libraries', once per process; summed RssAnon does not), of one process of each
        kind (``rss``, ``anon``) and of each kind summed; the cores this tree and other
        processes kept busy on average."""
        elapsed = max(1e-9, time.time() - self.t0)
        store, last = self.store_peak, self.last_store
        return {
            "samples": len(self.samples), "interval_s": self.interval_s,
            "object_store": {
                "capacity_bytes": self.probe.capacity if self.probe else None,
                "peak_used_bytes": store.get("object_store_bytes_used"),
                "peak_primary_copy_bytes": store.get("object_store_bytes_primary_copy"),
                "peak_fallback_bytes": store.get("object_store_bytes_fallback"),
                "peak_objects": store.get("num_local_objects"),
                "spilled_bytes": last.get("spilled_bytes_total"),
                "spilled_objects": last.get("spilled_objects_total"),
                "restored_bytes": last.get("restored_bytes_total"),
                "created_bytes": last.get("cumulative_created_bytes"),
            },
            "rss_peak_total_bytes": max((s["rss_total"] for s in self.samples), default=0),
            "rss_anon_peak_total_bytes": max((s["anon_total"] for s in self.samples), default=0),
            "rss_peak_process_bytes": {k: dict(v) for k, v in sorted(self.peak_proc.items())},
            "rss_peak_kind_sum_bytes": dict(sorted(self.peak_kind_sum.items())),
            "process_titles": {k: [t for t, _ in c.most_common(4)]
                               for k, c in sorted(self.titles.items())},
            "cores_busy": {"this_job": round(self._own_cpu / elapsed, 2),
                           "other_processes": round(self._other_cpu / elapsed, 2)},
            "probe_errors": dict(self.errors),
        }


__all__ = ["MemorySampler", "STORE_FIELDS", "StoreProbe", "descendants", "process_kind"]
