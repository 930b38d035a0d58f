"""Build the dask graph of a conversion from its plan and layout, and run it on the chosen scheduler.

Graph shape, per output shard (its header already written by the caller, `tasks.prepare_shard`):
write (one task per row range of each tensor; each hashes the bytes it writes) ──► checksum (one per
tensor: combines its tasks' piece digests) ──► seal (fsync). Big tensors are split into several row ranges,
so parallelism is not capped by the number of shards; every task passes only metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from . import tasks
from .checksums import piece_rows
from .layout import OutputLayout
from .plan.model import ConversionPlan

TASK_BYTES = 128 << 20  # output bytes per write task: big tensors split, small ones stay one task


@dataclasses.dataclass(frozen=True)
class GraphKeys:
    writes: dict[str, tuple[str, int]]  # write key -> (tensor name, bytes it writes)
    checksums: dict[str, str]  # checksum key -> tensor name
    seals: dict[str, str]  # seal key -> shard file name


def build_graph(plan: ConversionPlan, layout: OutputLayout, partial_dir: Path, shards: list[str],
                source: str, fingerprint: str, chunk_bytes: int,
                copy_ranges: dict[str, tuple[str, int, int] | None], run_token: str,
                task_bytes: int = TASK_BYTES) -> tuple[dict, GraphKeys]:
    """A low-level dask graph writing the given shards (those a resume has not proven complete).

    Every key starts with run_token (unique to this run's identity and output), so two conversions on one
    shared cluster never share a task.
    """
    graph: dict = {}
    writes, checksums, seals = {}, {}, {}
    by_name = {tp.name: tp for tp in plan.tensors}
    for shard in (s for s in layout.shards if s.file_name in shards):
        partial = str(partial_dir / (shard.file_name + ".partial"))
        tensor_sums = []
        for name in shard.tensors:
            slot, tp = layout.slots[name], by_name[name]
            write_keys = []
            for row_start, row_stop in task_row_ranges(slot.rows, slot.row_bytes, task_bytes):
                key = f"{run_token}-write-{name}-{row_start}"
                task = tasks.WriteTask(partial_path=partial, tensor=tp.to_dict(), offset=slot.start,
                                       row_bytes=slot.row_bytes, row_start=row_start, row_stop=row_stop,
                                       source=source, fingerprint=fingerprint, seed=plan.seed,
                                       chunk_bytes=chunk_bytes, copy_from=copy_ranges.get(name))
                graph[key] = (tasks.write_rows, task)
                writes[key] = (name, task.nbytes)
                write_keys.append(key)
            sum_key = f"{run_token}-checksum-{name}"
            graph[sum_key] = (tasks.combine_checksums, write_keys)
            checksums[sum_key] = name
            tensor_sums.append(sum_key)
        seal_key = f"{run_token}-seal-{shard.file_name}"
        graph[seal_key] = (tasks.seal_shard, partial, tensor_sums)
        seals[seal_key] = shard.file_name
    return graph, GraphKeys(writes, checksums, seals)


def task_row_ranges(rows: int, row_bytes: int, task_bytes: int = TASK_BYTES) -> list[tuple[int, int]]:
    """Row ranges of one tensor's write tasks: about task_bytes each, whole checksum pieces (so every
    task hashes its own pieces), at least one range (an empty tensor still gets its checksum)."""
    piece = piece_rows(row_bytes)
    step = piece * max(1, task_bytes // max(1, piece * row_bytes))
    return [(start, min(rows, start + step)) for start in range(0, max(rows, 1), step)]


@dataclasses.dataclass
class SchedulerChoice:
    threads: int = 2  # threaded scheduler (default, in-process)
    workers: int | None = None  # start a LocalCluster with this many worker processes
    address: str | None = None  # join an existing dask cluster
    scheduler_file: str | None = None

    @property
    def kind(self) -> str:
        if self.address or self.scheduler_file:
            return "distributed"
        return "local-cluster" if self.workers else "threads"


class SchedulerError(RuntimeError):
    """The dask scheduler asked for cannot be reached or started."""


def return_freed_memory_promptly() -> None:
    """Make glibc give freed blocks back to the OS instead of keeping them in per-thread arenas.

    Blocks are tens of MB; by default glibc raises its mmap threshold after the first such free and then
    serves later blocks from arenas that never shrink, so anonymous memory would creep up with the
    number of threads. A fixed threshold keeps every large block an mmap that is unmapped on free.
    Applied in this process and in the worker processes of a LocalCluster we start (never on the
    workers of a cluster we only join).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # this process's own symbols (find_library would run ldconfig: ~0.3 s)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (fixed)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class Executor:
    """A scheduler opened for one conversion: connected before the output is touched, so an unreachable
    cluster is an error that leaves nothing behind. Use as a context manager."""

    def __init__(self, choice: SchedulerChoice):
        self.choice = choice
        self.client = None
        self._cluster = None

    def __enter__(self) -> "Executor":
        return_freed_memory_promptly()
        if self.choice.kind == "threads":
            return self
        from distributed import Client, LocalCluster

        try:
            if self.choice.workers:
                # memory_limit=0: the nanny counts memory-mapped file pages (page cache in the worker's RSS)
                # as worker memory and would kill healthy workers; ":0" keeps the dashboard off a fixed port.
                self._cluster = LocalCluster(n_workers=self.choice.workers, threads_per_worker=1,
                                             processes=True, memory_limit=0, dashboard_address=":0")
                self.client = Client(self._cluster)
                self.client.run(return_freed_memory_promptly)
            elif self.choice.scheduler_file:
                self.client = Client(scheduler_file=self.choice.scheduler_file, timeout="30s")
            else:
                self.client = Client(self.choice.address, timeout="30s")
        except (OSError, TimeoutError, ValueError) as exc:
            self.__exit__(None, None, None)
            where = self.choice.scheduler_file or self.choice.address or "a LocalCluster"
            raise SchedulerError(f"cannot reach the dask scheduler ({where}): {exc}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.client is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None

    @property
    def concurrency(self) -> int:
        """Tasks that may run at once: threads here, or every worker thread of the cluster."""
        if self.client is None:
            return self.choice.threads
        return max(1, sum(self.client.nthreads().values()))

    def run(self, graph: dict, keys: GraphKeys, on_done: Callable[[str, object], None]) -> dict[str, object]:
        """Run every task; on_done(key, result) is called here as each write/checksum/seal ends."""
        return self.run_tasks(graph, [*keys.writes, *keys.checksums, *keys.seals], on_done)

    def run_tasks(self, graph: dict, wanted: list[str], on_done: Callable[[str, object], None]) -> dict[str, object]:
        """Compute the `wanted` keys of any dask graph; on_done(key, result) here as each one ends."""
        if not wanted:
            return {}
        if self.client is None:
            return _run_threaded(graph, wanted, self.choice.threads, on_done)
        return _run_on_client(self.client, graph, wanted, on_done)


def _run_threaded(graph, wanted, threads, on_done):
    import dask.threaded
    from dask.callbacks import Callback

    wanted_set = set(wanted)

    class Report(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in wanted_set:
                on_done(key, result)

    with Report():
        values = dask.threaded.get(graph, wanted, num_workers=threads)
    return dict(zip(wanted, values))


def _run_on_client(client, graph, wanted, on_done):
    from distributed import as_completed

    futures = client.get(graph, wanted, sync=False)
    key_of = {future.key: key for future, key in zip(futures, wanted)}
    results = {}
    for future in as_completed(futures):
        key = key_of[future.key]
        results[key] = future.result()
        on_done(key, results[key])
    return results
