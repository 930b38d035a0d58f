"""Read and lay out safetensors headers ourselves.

The safetensors library's `safe_open` maps whole files privately and any live slice keeps the whole map
alive; parsing the header here lets readers take views of a shared read-only map (or `pread` ranges) and
lets writers lay out every file before a single tensor byte is written.

Format: 8-byte little-endian header length N, N bytes of JSON, then the data section. Each JSON entry is
{"dtype": str, "shape": [int], "data_offsets": [begin, end]} relative to the data section; the optional
"__metadata__" entry maps strings to strings.
"""

from __future__ import annotations

import dataclasses
import math
import json
import os
import stat
import struct
from pathlib import Path

from .messages import short

# Bytes per element of every dtype safetensors stores.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# torch dtype names ("bfloat16") <-> safetensors dtype codes ("BF16").
TORCH_NAME_TO_CODE = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32",
    "uint32": "U32", "float32": "F32", "int64": "I64", "uint64": "U64", "float64": "F64",
}
CODE_TO_TORCH_NAME = {v: k for k, v in TORCH_NAME_TO_CODE.items()}


def torch_dtype(code_or_name):
    """'BF16', 'bfloat16', 'torch.bfloat16' or torch.bfloat16 -> torch.bfloat16 (imports torch)."""
    import torch

    if isinstance(code_or_name, torch.dtype):
        return code_or_name
    name = CODE_TO_TORCH_NAME.get(code_or_name, code_or_name)
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {short(code_or_name)}")
    return dtype


def safetensors_code(dtype) -> str:
    """The safetensors dtype code of a torch dtype (torch.bfloat16 -> "BF16")."""
    return TORCH_NAME_TO_CODE[str(dtype).removeprefix("torch.")]

MAX_HEADER_BYTES = 100_000_000  # the library's own limit
LFS_PREFIX = b"version https://git-lfs"  # how a Git LFS pointer file starts (the weights were never pulled)
# Tensors one file may list. Zero-size tensors take no data bytes, so the file's size does not bound their
# count; 200 000 is far above any real shard (a 671B MoE has ~92 000 tensors in all) and keeps a header of a
# million empty tensors from costing tens of seconds (and gigabytes) in every later step.
MAX_TENSORS_PER_FILE = 200_000


class SafetensorsFormatError(ValueError):
    """A safetensors file that cannot be trusted; the message starts with the file's path."""


@dataclasses.dataclass(frozen=True)
class TensorSpan:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    path: Path | str  # a URL for a remote file
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorSpan]  # in data order
    metadata: dict[str, str]
    file_size: int


def _fail(path: Path | str, message: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{path}: {message}")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO with a checkpoint's name must not block the open; only regular files are read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _fail(path, "is not a regular file (a FIFO, socket or device); only regular files are read")
        os.set_blocking(fd, True)
        with open(fd, "rb") as f:
            file_size = st.st_size
            header_len = header_length(path, f.read(8), file_size)
            raw = f.read(header_len)
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    return parse_header(path, raw, file_size)


def header_length(path: Path | str, prefix: bytes, file_size: int) -> int:
    """The header length a file's first 8 bytes give, checked against the limit and the file's size."""
    if len(prefix) < 8:
        raise _fail(path, f"truncated: {file_size} bytes is too short for a safetensors header")
    if prefix.startswith(LFS_PREFIX):
        raise _fail(path, "is a Git LFS pointer, not the weights (run `git lfs pull`)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise _fail(path, f"not a safetensors file (its first 8 bytes give a header length of "
                          f"{header_len}, over the {MAX_HEADER_BYTES}-byte limit)")
    if 8 + header_len > file_size:
        raise _fail(path, f"header length {header_len} is larger than the file ({file_size} bytes); "
                          "the file is truncated or not safetensors")
    return header_len


def parse_header(path: Path | str, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Parse and validate the header bytes `raw` (after the 8-byte length) of a file of `file_size` bytes;
    `path` (a path or a URL) only names the file in errors. Used for local files and remote ones alike."""
    header_len = len(raw)
    listed = raw.count(b'"data_offsets"')  # an upper bound of the entries, counted before parsing anything
    if listed > MAX_TENSORS_PER_FILE:
        raise _fail(path, f"header lists {listed} tensors, over the {MAX_TENSORS_PER_FILE}-tensor limit for one "
                          "file")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise _fail(path, f"tensor '{_label(exc.args[0])}' is named twice in the header") from None
    except (ValueError, RecursionError) as exc:  # bad JSON/UTF-8, over-long integers, absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _fail(path, f"header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    if len(header) > MAX_TENSORS_PER_FILE + 1:  # entries without data_offsets are refused below anyway
        raise _fail(path, f"header lists {len(header)} entries, over the {MAX_TENSORS_PER_FILE}-tensor limit for "
                          "one file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "'__metadata__' must map strings to strings")
    data_start = 8 + header_len
    data_size = file_size - data_start
    spans = [_parse_entry(path, name, entry, data_start) for name, entry in header.items()]
    spans.sort(key=lambda s: (s.start, s.end))
    expected = data_start
    for span in spans:
        if span.start != expected:
            kind = "overlaps the previous tensor" if span.start < expected else "leaves a gap before it"
            raise _fail(path, f"tensor '{_label(span.name)}' {kind} (offset {span.start - data_start}, "
                              f"expected {expected - data_start})")
        expected = span.end
    if expected - data_start > data_size:
        raise _fail(path, f"truncated: tensors need {expected - data_start} data bytes but the file has "
                          f"{data_size}")
    return SafetensorsHeader(path, data_start, {s.name: s for s in spans}, dict(metadata), file_size)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _label(name: str) -> str:
    """A tensor name as messages show it: control characters escaped (a message stays one line), an
    absurdly long name cut."""
    if not name.isprintable():
        name = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return name if len(name) <= 200 else name[:195] + "[...]"


def _parse_entry(path: Path, key: str, entry: object, data_start: int) -> TensorSpan:
    name = _label(key)
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor '{name}': entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(path, f"tensor '{name}': unknown dtype {short(dtype)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _fail(path, f"tensor '{name}': shape must be a list of non-negative integers, got {short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise _fail(path, f"tensor '{name}': data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {short(offsets)}")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        needs = f"{expected} bytes" if expected < 10**30 else "more bytes than any file holds"
        raise _fail(path, f"tensor '{name}': {dtype} {short(shape)} needs {needs} but its offsets span "
                          f"{offsets[1] - offsets[0]}")
    return TensorSpan(key, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def layout_header(entries: list[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a file before writing it.

    entries: (name, dtype code, shape), in the order they should be stored. Tensors are ordered by
    element size, largest first (stable), so every tensor starts aligned for its dtype with no gaps
    (safetensors forbids gaps). Returns the full header bytes (length prefix + JSON padded with spaces so
    the data section starts 8-byte aligned) and {name: (absolute start, absolute end)}.
    """
    ordered = sorted(entries, key=lambda e: -DTYPE_SIZES[e[1]])
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    relative: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in ordered:
        nbytes = DTYPE_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = (offset, offset + nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text
    data_start = len(blob)
    return blob, {name: (data_start + a, data_start + b) for name, (a, b) in relative.items()}
