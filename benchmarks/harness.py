"""Shared measuring helpers for the benchmarks: anonymous memory of a process tree, cold caches, cgroup v1
memory caps, disk space. Standard library only (the driver must not import torch: its own memory is not
what we measure).

`run_measured(argv, name)` runs one command in a fresh cgroup v1 memory cgroup (a child of our own), so
every process it starts, however deep, is found through `cgroup.procs`; a sampler thread sums their
RssAnon (`/proc/<pid>/status`) every ~5 ms. With `cap_bytes` the cgroup gets `memory.limit_in_bytes`:
page cache is reclaimed under the cap, anonymous memory over it is OOM-killed (ENGINEERING.md).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def rss_anon(pid: int) -> int | None:
    """RssAnon of one process in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0  # a zombie has no RssAnon line


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache (root only): every case starts cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(path).free


def tree_bytes(path: str | os.PathLike) -> int:
    """Apparent size of a file or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / rel.lstrip("/")
    raise RuntimeError("no cgroup v1 memory controller")


class MemoryCgroup:
    """A child memory cgroup of our own; `limit` None means uncapped (used only to find the tree)."""

    def __init__(self, name: str, limit: int | None = None):
        self.path = own_memory_cgroup() / f"mmrec-bench-{name}-{os.getpid()}"
        if self.path.exists():
            self._remove()
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit)))
        self.limit = limit

    def add_self(self) -> None:  # used as preexec_fn: the child joins before it execs
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def stat(self) -> dict:
        out = {}
        for key in ("memory.max_usage_in_bytes", "memory.failcnt"):
            try:
                out[key.split(".", 1)[1]] = int((self.path / key).read_text())
            except (FileNotFoundError, ValueError):
                pass
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                k, v = line.split()
                out["oom_" + k if not k.startswith("oom") else k] = int(v)
        except FileNotFoundError:
            pass
        return out

    def close(self) -> list[str]:
        """Kill what is left in it (only processes the measured command started) and remove it."""
        leftovers = []
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                cmd = "?"
            leftovers.append(f"{pid}: {cmd}")
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self._remove()
        return leftovers

    def _remove(self) -> None:
        for _ in range(200):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


class TreeSampler(threading.Thread):
    """Sums RssAnon over every process of a cgroup every `interval` seconds."""

    def __init__(self, cgroup: MemoryCgroup, interval: float = 0.005):
        super().__init__(daemon=True)
        self.cgroup, self.interval = cgroup, interval
        self.samples: list[tuple[float, int, int]] = []  # (t, summed RssAnon, processes)
        self.peak, self.peak_procs = 0, 0
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = self.cgroup.pids()
            total = 0
            for pid in pids:
                total += rss_anon(pid) or 0
            now = time.perf_counter() - self.t0
            self.samples.append((now, total, len(pids)))
            if total > self.peak:
                self.peak = total
            self.peak_procs = max(self.peak_procs, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def timeline(self, bucket: float = 0.1) -> list[list[float]]:
        """[t seconds, max RssAnon MiB] per bucket: small enough for JSON, keeps every peak."""
        out: dict[int, float] = {}
        for t, value, _ in self.samples:
            b = int(t / bucket)
            out[b] = max(out.get(b, 0.0), value / MIB)
        return [[round(b * bucket, 3), round(v, 2)] for b, v in sorted(out.items())]


@dataclasses.dataclass
class Measured:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_anon: int
    peak_processes: int
    samples: int
    timeline: list
    disk_read_bytes: int  # block I/O of the whole tree (getrusage of reaped children)
    disk_written_bytes: int
    cpu_user_s: float  # CPU time of the whole tree (getrusage of reaped children)
    cpu_system_s: float
    cgroup: dict
    cap_bytes: int | None
    oom_killed: bool
    stdout: str
    stderr_tail: str
    leftover_processes: list

    def to_dict(self, with_stdout: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_stdout:
            d.pop("stdout")
        return d


def run_measured(argv: list[str], name: str, cap_bytes: int | None = None, cold: bool = True,
                 sync_after: bool = True, interval: float = 0.005, cwd: str | None = None,
                 env: dict | None = None, log=None) -> Measured:
    """Run argv in its own memory cgroup; wall time includes a final sync (data on disk, as cp && sync)."""
    if cold:
        drop_caches()
    cgroup = MemoryCgroup(name, cap_bytes)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = TreeSampler(cgroup, interval)
    out_path = Path(f"/tmp/mmrec-bench-{name}-{os.getpid()}.out")
    err_path = out_path.with_suffix(".err")
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            sampler.start()
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, env=env, preexec_fn=cgroup.add_self)
            returncode = proc.wait()
            if sync_after and returncode == 0:
                os.sync()
            wall = time.perf_counter() - start
        sampler.stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat = cgroup.stat()
    finally:
        if sampler.is_alive():
            sampler.stop()
        leftovers = cgroup.close()
    if leftovers and log:
        log(f"  note: killed {len(leftovers)} leftover process(es) of {name}: {leftovers}")
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    oom = returncode in (-9, 137) and (stat.get("oom_kill", 0) > 0 or cap_bytes is not None)
    return Measured(argv=[str(a) for a in argv], returncode=returncode, wall_s=wall,
                    peak_rss_anon=sampler.peak, peak_processes=sampler.peak_procs,
                    samples=len(sampler.samples), timeline=sampler.timeline(),
                    disk_read_bytes=(after.ru_inblock - before.ru_inblock) * 512,
                    disk_written_bytes=(after.ru_oublock - before.ru_oublock) * 512,
                    cpu_user_s=after.ru_utime - before.ru_utime, cpu_system_s=after.ru_stime - before.ru_stime,
                    cgroup=stat, cap_bytes=cap_bytes, oom_killed=oom, stdout=stdout,
                    stderr_tail=stderr[-3000:], leftover_processes=leftovers)


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {"cpus": os.cpu_count()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal", "SwapTotal")):
                k, v = line.split(":")
                info[k] = int(v.split()[0]) * 1024
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu_model"] = model[0].split(":", 1)[1].strip() if model else None
        info["kernel"] = os.uname().release
    except OSError:
        pass
    return info
