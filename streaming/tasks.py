"""The functions dask runs. Each takes and returns only small metadata (paths, names, integers): workers
open and memory-map the sources themselves, so no tensor data ever travels between tasks."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import mmap
import os
import threading

from .checksums import PieceHasher, combine, piece_rows
from .plan.model import TensorPlan
from .sources.paths import remote_url

_catalog_lock = threading.Lock()
_catalogs: dict[str, tuple[str, object]] = {}  # source path -> (fingerprint, opened catalog)
COPY_BLOCK = 16 << 20  # bytes hashed and written at a time when copying a source range


def worker_catalog(source: str, fingerprint: str):
    """One opened source per worker process (threads share it; reads are views of shared maps).

    Keyed by the run's source fingerprint: a long-lived worker (a joined cluster, a notebook) that sees
    the same path hold other files reopens it instead of serving stale maps. A remote source opened by
    this very process (the driver, under the threaded scheduler) is reused: its headers are not fetched again.
    """
    with _catalog_lock:
        cached = _catalogs.get(source)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        from .sources import SourceError, open_source

        catalog = None
        if remote_url(source):  # only a URL imports the HTTP code (open_source would import it anyway)
            from .sources.remote import opened_catalog

            catalog = opened_catalog(fingerprint)
        if catalog is None:
            catalog = open_source(source)
        if catalog.fingerprint() != fingerprint:
            raise SourceError(f"{source}: the source changed while it was being converted")
        _catalogs[source] = (fingerprint, catalog)
        return catalog


@contextlib.contextmanager
def naming_os_errors(path: str):
    """Give an OSError raised without a file name (pwrite, ftruncate, fsync: ENOSPC, EFBIG, EIO) the
    path it was writing, so the user's one-line error says which file failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def prepare_shard(partial_path: str, header: bytes, size: int) -> str:
    """Give the shard its final size and its header; tensors fill it at their offsets (run by the driver
    before the graph starts, so the first bytes land before any heavy import).

    No O_TRUNC, so it is idempotent: a partial file of an interrupted run keeps its bytes until tasks
    overwrite them. The layout covers every byte of the file (header, then tensors without gaps; zero
    tensors are punched as holes), so stale bytes are all replaced, and ftruncate to the exact size drops
    anything longer.
    """
    with naming_os_errors(partial_path):
        fd = os.open(partial_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            _pwrite_all(fd, header, 0)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return partial_path


@dataclasses.dataclass(frozen=True)
class WriteTask:
    """Rows [row_start, row_stop) of one output tensor, written at their offset in a partial shard.

    row_start is a checksum piece boundary (checksums.piece_rows), so the task hashes whole pieces.
    copy_from = (file, start, end) of a byte-exact source range (read once, hashed, written); otherwise
    rows are materialized block by block within chunk_bytes.
    """

    partial_path: str
    tensor: dict  # TensorPlan.to_dict(): plain data, cheap to send to a worker
    offset: int  # the tensor's first byte in the shard
    row_bytes: int
    row_start: int
    row_stop: int
    source: str
    fingerprint: str
    seed: int
    chunk_bytes: int
    copy_from: tuple[str, int, int] | None

    @property
    def first_byte(self) -> int:
        return self.offset + self.row_start * self.row_bytes

    @property
    def nbytes(self) -> int:
        return (self.row_stop - self.row_start) * self.row_bytes


def write_rows(task: WriteTask) -> list[bytes]:
    """Write one task's rows; returns the digests of the checksum pieces it covers, in order."""
    with naming_os_errors(task.partial_path):
        hasher = PieceHasher(piece_rows(task.row_bytes) * task.row_bytes)
        fd = os.open(task.partial_path, os.O_WRONLY)
        try:
            if task.copy_from is not None:
                _copy_range(task, fd, hasher)
            elif zero_init(TensorPlan.from_dict(task.tensor)):
                _zero_range(fd, task.first_byte, task.nbytes)
                hasher.update_zeros(task.nbytes)
            else:
                _materialize_range(task, fd, hasher)
        finally:
            os.close(fd)
        return hasher.finish()


def combine_checksums(piece_digests: list[list[bytes]]) -> str:
    """A tensor's checksum from its write tasks' piece digests (tasks in row order)."""
    return combine([digest for task_digests in piece_digests for digest in task_digests])


def zero_init(tp: TensorPlan) -> bool:
    """Whether a planned tensor is all zeros by its init rule (nothing to generate or write)."""
    from mmrec.schema import init_rule

    return tp.kind == "init" and (tp.init or init_rule(tp.name, len(tp.shape))) == "zeros"


def _materialize_range(task: WriteTask, fd: int, hasher: PieceHasher) -> None:
    import torch

    from .transforms import row_producer, rows_per_block

    if torch.get_num_threads() != 1:
        # one torch thread per task: parallelism comes from the tasks, and a float64 product's bytes could
        # otherwise depend on how many threads its BLAS call used (convert() restores the caller's count)
        torch.set_num_threads(1)
    plan = TensorPlan.from_dict(task.tensor)
    catalog = worker_catalog(task.source, task.fingerprint) if plan.sources else None
    step = rows_per_block(plan, task.chunk_bytes)
    produce = row_producer(plan, catalog, task.seed)  # once per task: a product's right operand is reused
    for start in range(task.row_start, task.row_stop, step):
        stop = min(task.row_stop, start + step)
        data = memoryview(produce(start, stop).reshape(-1).view(torch.uint8).numpy())
        hasher.update(data)
        _pwrite_all(fd, data, task.offset + start * task.row_bytes)


def seal_shard(partial_path: str, _ready: object = None) -> str:
    """Flush the shard to disk; only then may the journal call it complete."""
    with naming_os_errors(partial_path):
        fd = os.open(partial_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return partial_path


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


@functools.lru_cache(maxsize=1)
def _linux_libc():
    """libc with fallocate (which Python's os module lacks for punching holes), or None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return None
    return libc


def _copy_range(task: WriteTask, dst_fd: int, hasher: PieceHasher) -> None:
    """Hash the source range straight from a read-only map of it and write it from there: one copy,
    page cache to page cache, like copy_file_range, but with the bytes in hand for the checksum.
    Where the source cannot be mapped (some network filesystems), read it into a buffer instead.
    (A source truncated by someone else while it is mapped ends the process with SIGBUS: RELIABILITY.md.)"""
    src_path, src_start, _ = task.copy_from
    first = src_start + task.row_start * task.row_bytes
    if task.nbytes == 0:
        return
    if remote_url(src_path):  # a remote source (any case of the scheme): no map, stream it from the server
        _copy_from_server(task, first, dst_fd, hasher)
        return
    with naming_os_errors(src_path):  # errors of the source name the source, not the shard
        src_fd = os.open(src_path, os.O_RDONLY)
        try:
            if os.fstat(src_fd).st_size < first + task.nbytes:
                raise OSError(errno.EIO, f"source file ends before byte {first + task.nbytes}", src_path)
            aligned = first - first % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(src_fd, first + task.nbytes - aligned, access=mmap.ACCESS_READ,
                                    offset=aligned)
            except (OSError, ValueError):
                _copy_by_reading(task, src_fd, first, dst_fd, hasher)
                return
        finally:
            os.close(src_fd)
        mapping.madvise(mmap.MADV_SEQUENTIAL)
        mapping.madvise(mmap.MADV_WILLNEED)  # start reading the whole range now, ahead of the hashing
    try:
        view = memoryview(mapping)[first - aligned:]
        take = _copy_sink(task, dst_fd, hasher)
        try:
            for done in range(0, task.nbytes, COPY_BLOCK):
                take(view[done:done + COPY_BLOCK])  # the slice goes with the call: the map can close after
        finally:
            view.release()
    finally:
        try:
            mapping.close()
        except BufferError:  # a traceback still holds a view of it: the error in flight matters, not this
            pass


def _copy_by_reading(task: WriteTask, src_fd: int, first: int, dst_fd: int, hasher: PieceHasher) -> None:
    buffer = memoryview(bytearray(min(COPY_BLOCK, task.nbytes)))
    take = _copy_sink(task, dst_fd, hasher)
    done = 0
    while done < task.nbytes:
        got = os.preadv(src_fd, [buffer[:min(len(buffer), task.nbytes - done)]], first + done)
        if got == 0:
            raise OSError(errno.EIO, f"source file ends before byte {first + task.nbytes}")
        take(buffer[:got])
        done += got


def _copy_from_server(task: WriteTask, first: int, dst_fd: int, hasher: PieceHasher) -> None:
    """_copy_by_reading for a remote source: the range comes as HTTP range requests in blocks of at most
    COPY_BLOCK (a dropped connection resumes where it stopped), each block hashed and written as it arrives."""
    catalog = worker_catalog(task.source, task.fingerprint)
    catalog.stream(task.copy_from[0], first, task.nbytes, _copy_sink(task, dst_fd, hasher), COPY_BLOCK)


def _copy_sink(task: WriteTask, dst_fd: int, hasher: PieceHasher):
    """take(block): hash the next block of a copied range and write it at its place in the shard. The
    three ways a range is read (a map, preadv, HTTP) all hand their blocks, in order, to one of these."""
    done = 0

    def take(block) -> None:
        nonlocal done
        hasher.update(block)
        with naming_os_errors(task.partial_path):
            _pwrite_all(dst_fd, block, task.first_byte + done)
        done += len(block)

    return take


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _zero_range(fd: int, offset: int, nbytes: int) -> None:
    """Make bytes [offset, offset + nbytes) zeros without writing them: a hole (free on a fresh file; on a
    partial file left by an interrupted run it drops stale bytes). Falls back to writing zeros."""
    if nbytes == 0:
        return
    libc = _linux_libc()  # any failure (EOPNOTSUPP, ENOSYS, ...) falls through to writing the zeros
    if libc and libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, nbytes) == 0:
        return
    # no fallocate (not Linux) or the filesystem cannot punch holes: write the zeros
    zeros = bytes(min(COPY_BLOCK, nbytes))
    for start in range(0, nbytes, len(zeros)):
        _pwrite_all(fd, memoryview(zeros)[:min(len(zeros), nbytes - start)], offset + start)
