"""The source catalog: every tensor of a checkpoint as byte ranges in files, built from headers only.

Nothing here imports torch at module level: building a catalog (and `mmrec inspect`) only parses
headers. `SourceCatalog.read` imports torch lazily and returns views of a shared read-only memory map,
so reading a tensor costs page cache, not anonymous memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import stat
import threading
from pathlib import Path

from mmrec.safetensors_format import DTYPE_SIZES, torch_dtype
from mmrec.shards import TOKENIZER_FILES

from ..terminal import escape


class SourceError(ValueError):
    """A source checkpoint that cannot be used; the message names the file (and tensor) and the problem.

    The message is one printable line whatever the file holds: control characters in names taken from
    the file are escaped, and an absurdly long message is cut."""

    def __init__(self, message: str):
        message = escape(message)
        if len(message) > 1000:
            message = message[:990] + " [...]"
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Piece:
    file: str  # absolute path
    offset: int  # absolute byte offset in `file` of element [0, 0, ...] of this piece
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """C-contiguous, ignoring the stride of size-1 dims (torch does the same)."""
    expected = 1
    for d, s in zip(reversed(shape), reversed(strides)):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str
    original_name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    join_dim: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    def byte_range(self) -> tuple[str, int, int] | None:
        """(file, start, end) when the whole tensor is one C-contiguous run of bytes in one file."""
        if len(self.pieces) != 1:
            return None
        p = self.pieces[0]
        if not is_contiguous(p.shape, p.strides):
            return None
        return (p.file, p.offset, p.offset + self.nbytes)

    def to_dict(self) -> dict:
        return {"name": self.name, "original_name": self.original_name, "dtype": self.dtype,
                "shape": list(self.shape), "join_dim": self.join_dim,
                "pieces": [[p.file, p.offset, list(p.shape), list(p.strides)] for p in self.pieces]}


# Wrapper prefixes (DDP, torch.compile) and base-model prefixes of HF causal-LM checkpoints.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "transformer.", "gpt_neox.")


def normalize_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix):]
                changed = True
    return name




class SourceCatalog:
    """Tensors of one checkpoint (any layout), addressed by normalized name."""

    def __init__(self, root: Path, layout: str, files: list[Path], tensors: dict[str, SourceTensor],
                 config: dict | None, aux_files: list[Path]):
        self.root = root
        self.layout = layout
        self.files = files
        self.tensors = tensors
        self.config = config
        self.aux_files = aux_files
        self._maps: dict[str, mmap.mmap | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SourceCatalog({str(self.root)!r}, layout={self.layout!r}, {len(self.tensors)} tensors)"

    def __getstate__(self):  # picklable for dask workers: memory maps are reopened lazily
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------------
    def read(self, name: str, start: int = 0, stop: int | None = None):
        """Rows [start, stop) along dim 0 of the logical tensor (elements for 1-D) as a torch tensor.

        When the bytes allow it the result is a view of a shared READ-ONLY map of the file: never modify
        it in place (that faults); `.clone()`/`.to()` first. Joins of several pieces return a new tensor.
        """
        import torch

        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.root}: no tensor named {name!r}")
        dtype = torch_dtype(t.dtype)
        if not t.shape:  # a scalar: no rows to slice
            return self._piece_rows(t.pieces[0], dtype, 0, None)
        rows = t.shape[0]
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{name}: rows [{start}, {stop}) outside [0, {rows})")
        if len(t.pieces) == 1:
            return self._piece_rows(t.pieces[0], dtype, start, stop)
        if t.join_dim == 0:
            # Rows may straddle pieces: take the part of each piece that overlaps [start, stop).
            parts, base = [], 0
            for p in t.pieces:
                lo, hi = max(start, base), min(stop, base + p.shape[0])
                if lo < hi:
                    parts.append(self._piece_rows(p, dtype, lo - base, hi - base))
                base += p.shape[0]
            if len(parts) == 1:
                return parts[0]
            return torch.cat(parts, 0) if parts else torch.empty((0, *t.shape[1:]), dtype=dtype)
        # Joins along a later dim: every piece holds all rows; assemble this row block only.
        parts = [self._piece_rows(p, dtype, start, stop) for p in t.pieces]
        return torch.cat(parts, t.join_dim)

    def _piece_rows(self, p: Piece, dtype, start: int, stop: int | None):
        import torch

        itemsize = dtype.itemsize
        if p.shape:
            shape = (stop - start, *p.shape[1:])
            offset = p.offset + start * p.strides[0] * itemsize
        else:
            shape, offset = (), p.offset
        strides = p.strides
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        span = 1 + sum((d - 1) * s for d, s in zip(shape, strides))  # elements from first to last
        buf = self._map(p.file)
        if buf is not None and offset % itemsize == 0 and offset + span * itemsize <= len(buf):
            flat = _frombuffer(buf, dtype, span, offset)
        else:  # no map (or unaligned): a private copy of just these bytes
            flat = torch.frombuffer(self._pread(p.file, offset, span * itemsize), dtype=dtype)
        if is_contiguous(shape, strides):
            return flat.view(shape)
        return flat.as_strided(shape, strides)

    def _map(self, file: str):
        with self._lock:
            if file not in self._maps:
                try:
                    with open(file, "rb") as f:
                        self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):
                    self._maps[file] = None  # e.g. a filesystem without mmap: fall back to pread
            return self._maps[file]

    @staticmethod
    def _pread(file: str, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        fd = os.open(file, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise SourceError(f"{file}: unexpected end of file at byte {offset + done}")
                done += got
        finally:
            os.close(fd)
        return buf

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                if m is not None:
                    try:
                        m.close()
                    except BufferError:  # a live tensor still views it; the GC closes it later
                        pass
            self._maps.clear()

    # -- identity -----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Stable hash of the files' identities (name, size, mtime) and the parsed headers (refuses a changed
        --resume)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(json.dumps(self._file_identity(f)).encode())
        for t in self.tensors.values():
            d = t.to_dict()
            d["pieces"] = [[Path(p[0]).name, *p[1:]] for p in d["pieces"]]  # independent of the mount point
            h.update(json.dumps(d, sort_keys=True).encode())
        h.update(json.dumps(self.config, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def _file_identity(self, file: Path) -> list:
        """What says a file is unchanged: its name, size and mtime (a remote file: URL, size, ETag)."""
        st = file.stat()
        return [file.name, st.st_size, st.st_mtime_ns]


_warning_filtered = False


def _frombuffer(buf, dtype, count: int, offset: int):
    """torch.frombuffer on a read-only map. torch warns that the buffer is not writable; we never
    write to these tensors (the engine treats sources as read-only), so that one warning is silenced."""
    global _warning_filtered
    import torch

    if not _warning_filtered:
        import warnings

        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        _warning_filtered = True
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def build_tensors(entries: list[SourceTensor], describe) -> dict[str, SourceTensor]:
    """Key tensors by normalized name, refusing two source tensors that normalize to one name.

    describe(tensor) names where a tensor comes from, for the message.
    """
    out: dict[str, SourceTensor] = {}
    for t in entries:
        prev = out.get(t.name)
        if prev is not None:
            if prev.original_name == t.original_name:
                raise SourceError(f"tensor '{t.original_name}' appears twice: in {describe(prev)} and "
                                  f"{describe(t)}")
            raise SourceError(f"tensors '{prev.original_name}' ({describe(prev)}) and '{t.original_name}' "
                              f"({describe(t)}) both normalize to '{t.name}'")
        out[t.name] = t
    return out


def find_aux_files(root: Path) -> list[Path]:
    return [root / n for n in TOKENIZER_FILES if (root / n).is_file()]


def load_json(path: Path) -> dict:
    try:
        # O_NONBLOCK: opening a FIFO named config.json must not wait for a writer; only regular files are read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SourceError(f"{path}: is not a regular file; only regular files are read")
        os.set_blocking(fd, True)
        with open(fd, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_json_object(path, data)


def parse_json_object(where, data: bytes) -> dict:
    """The JSON object in `data` (a file's bytes; `where` names the file or URL), or one SourceError."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON/UTF-8, over-long integers, absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise SourceError(f"{where}: not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise SourceError(f"{where}: expected a JSON object")
    return value
