"""The functions dask runs. Each takes and returns only small metadata (paths, names, integers): workers
open and memory-map the sources themselves, so no tensor data ever travels between tasks."""

from __future__ import annotations

import contextlib
import errno
import os
import threading

from .plan.model import TensorPlan

_catalog_lock = threading.Lock()
_catalogs: dict[str, tuple[str, object]] = {}  # source path -> (fingerprint, opened catalog)
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call and per read-back piece


def worker_catalog(source: str, fingerprint: str):
    """One opened source per worker process (threads share it; reads are views of shared maps).

    Keyed by the run's source fingerprint: a long-lived worker (a joined cluster, a notebook) that sees
    the same path hold other files reopens it instead of serving stale maps.
    """
    with _catalog_lock:
        cached = _catalogs.get(source)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        from .sources import SourceError, open_source

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
    """Give the shard its final size and its header; tensors fill it at their offsets.

    Idempotent: no O_TRUNC. dask reruns this task when the worker holding its result dies, possibly after
    other workers already wrote tensors into the shard; truncating would wipe them. The layout covers
    every byte of the file (header, then tensors without gaps), so stale bytes of an older partial file are
    all overwritten, and ftruncate to the exact size drops anything longer.
    """
    with naming_os_errors(partial_path):
        fd = os.open(partial_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            _pwrite_all(fd, header, 0)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return partial_path


def write_rows(partial_path: str, tensor: dict, offset: int, row_bytes: int, row_start: int,
               row_stop: int, source: str, fingerprint: str, seed: int, chunk_bytes: int,
               copy_from: tuple[str, int, int] | None, _ready: object = None) -> int:
    """Write rows [row_start, row_stop) of one output tensor at its offset; returns bytes written.

    copy_from = (file, start, end) of a byte-exact source range: copied with os.copy_file_range, never
    through Python buffers. Otherwise rows are materialized block by block within chunk_bytes.
    """
    with naming_os_errors(partial_path):
        return _write_rows(partial_path, tensor, offset, row_bytes, row_start, row_stop, source, fingerprint,
                           seed, chunk_bytes, copy_from)


def _write_rows(partial_path, tensor, offset, row_bytes, row_start, row_stop, source, fingerprint, seed,
                chunk_bytes, copy_from) -> int:
    first = offset + row_start * row_bytes
    nbytes = (row_stop - row_start) * row_bytes
    fd = os.open(partial_path, os.O_WRONLY)
    try:
        if copy_from is not None:
            _copy_range(copy_from[0], copy_from[1] + row_start * row_bytes, fd, first, nbytes)
            return nbytes
        import torch

        from .transforms import materialize_rows, rows_per_block

        plan = TensorPlan.from_dict(tensor)
        catalog = worker_catalog(source, fingerprint) if plan.sources else None
        step = rows_per_block(plan, chunk_bytes)
        for start in range(row_start, row_stop, step):
            stop = min(row_stop, start + step)
            block = materialize_rows(plan, catalog, start, stop, seed)
            data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(fd, memoryview(data), offset + start * row_bytes)
    finally:
        os.close(fd)
    return nbytes


CHECKSUM_ALGORITHM = "xxh3_128"  # ~14x sha256's speed here: checksums no longer cost a fifth of a run


def checksum_range(partial_path: str, start: int, end: int, _ready: object = None) -> str:
    """Checksum (xxh3-128, hex) of bytes [start, end) as they are in the file: read back, so it proves
    what landed, and independent of how the tensor was split into tasks and blocks."""
    import xxhash

    digest = xxhash.xxh3_128()
    fd = os.open(partial_path, os.O_RDONLY)
    try:
        position = start
        while position < end:
            piece = os.pread(fd, min(COPY_CHUNK, end - position), position)
            if not piece:
                raise OSError(errno.EIO, f"file ends at byte {position}, expected {end}", partial_path)
            digest.update(piece)
            position += len(piece)
    finally:
        os.close(fd)
    return digest.hexdigest()


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


def _copy_range(src_path: str, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    src_fd = os.open(src_path, os.O_RDONLY)
    try:
        done = 0
        use_kernel_copy = hasattr(os, "copy_file_range")
        while done < nbytes:
            count = min(COPY_CHUNK, nbytes - done)
            if use_kernel_copy:
                try:
                    copied = os.copy_file_range(src_fd, dst_fd, count, src_offset + done, dst_offset + done)
                except OSError as exc:  # e.g. across filesystems on old kernels: fall back
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    use_kernel_copy = False
                    continue
            else:
                piece = os.pread(src_fd, count, src_offset + done)
                _pwrite_all(dst_fd, piece, dst_offset + done)
                copied = len(piece)
            if copied == 0:
                raise OSError(errno.EIO, f"source file ends before byte {src_offset + nbytes}", src_path)
            done += copied
    finally:
        os.close(src_fd)
