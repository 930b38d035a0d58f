"""Tensor checksums, computed from the bytes while the writer holds them (never by reading the output back).

Definition (report field `checksum_algorithm` = ALGORITHM): a tensor's bytes are cut into pieces of
`piece_rows(row_bytes)` whole rows (the last piece may be shorter; an empty tensor is one empty piece);
each piece gets its xxh3-128 digest; the tensor's checksum is the xxh3-128 (hex) of those 16-byte digests
concatenated. Pieces depend only on the tensor's shape and dtype, so write tasks (which start on piece
boundaries) hash their own pieces in any order, on any worker, and the result never depends on the
scheduler, worker count or memory budget. `mmrec verify` reads the file and computes the same thing.

Outputs written before this definition (report field "xxh3_128") hold the xxh3-128 of each tensor's
bytes whole; `file_checksum` still checks those.
"""

from __future__ import annotations

import functools
import os

import xxhash

ALGORITHM = "xxh3_128/16MiB-row-pieces"
WHOLE_TENSOR_ALGORITHM = "xxh3_128"  # checksum format of older outputs (one digest of all bytes)
PIECE_BYTES = 16 << 20  # target piece size; a piece is always whole rows
READ_BYTES = 16 << 20  # bytes per read when checking a file


def piece_rows(row_bytes: int) -> int:
    """Rows per checksum piece for a tensor whose rows (dim 0; elements of a 1-D tensor) take row_bytes."""
    return max(1, PIECE_BYTES // max(1, row_bytes))


class PieceHasher:
    """Digests of consecutive pieces of `piece_bytes` bytes, fed in order in blocks of any size."""

    def __init__(self, piece_bytes: int):
        self.piece_bytes = max(1, piece_bytes)
        self.digests: list[bytes] = []
        self._hash = xxhash.xxh3_128()
        self._filled = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), self.piece_bytes - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_bytes:
                self._end_piece()

    def update_zeros(self, nbytes: int) -> None:
        """As update(bytes(nbytes)), without holding nbytes of zeros."""
        while nbytes:
            take = min(nbytes, self.piece_bytes - self._filled)
            if self._filled == 0 and take == self.piece_bytes:
                self.digests.append(_zeros_digest(take))
            else:
                self._hash.update(_zeros(take))
                self._filled += take
                if self._filled == self.piece_bytes:
                    self._end_piece()
            nbytes -= take

    def _end_piece(self) -> None:
        self.digests.append(self._hash.digest())
        self._hash = xxhash.xxh3_128()
        self._filled = 0

    def finish(self) -> list[bytes]:
        """The digests of every piece fed, the last (short or empty) one included when it has bytes or
        when nothing was fed at all."""
        if self._filled or not self.digests:
            self._end_piece()
        return self.digests


@functools.lru_cache(maxsize=8)
def _zeros_digest(nbytes: int) -> bytes:
    return xxhash.xxh3_128(_zeros(nbytes)).digest()


@functools.lru_cache(maxsize=2)
def _zeros(nbytes: int) -> bytes:
    return bytes(nbytes)


def combine(digests: list[bytes]) -> str:
    """The tensor checksum from its piece digests, in row order."""
    return xxhash.xxh3_128(b"".join(digests)).hexdigest()


def file_checksum(path: str, start: int, end: int, row_bytes: int, algorithm: str = ALGORITHM) -> str:
    """The checksum of bytes [start, end) of a file (one tensor with rows of row_bytes), read in order."""
    if algorithm not in (ALGORITHM, WHOLE_TENSOR_ALGORITHM):
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (written by a newer mmrec?)")
    whole = algorithm == WHOLE_TENSOR_ALGORITHM
    hasher = PieceHasher(end - start if whole else piece_rows(row_bytes) * row_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
        position = start
        while position < end:
            piece = os.pread(fd, min(READ_BYTES, end - position), position)
            if not piece:
                raise OSError(5, f"file ends at byte {position}, expected {end}", path)
            hasher.update(piece)
            position += len(piece)
    finally:
        os.close(fd)
    digests = hasher.finish()
    return digests[0].hex() if whole else combine(digests)
