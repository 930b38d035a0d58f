"""Lazy reader for `torch.save` zip files (.pt/.pth/.bin) that never runs code from the pickle.

A torch zip holds `<prefix>/data.pkl` (the object tree; tensors as calls to `_rebuild_tensor_v2` on
persistent storage ids) and one stored (uncompressed) entry `<prefix>/data/<key>` per storage. We unpickle
`data.pkl` with a whitelist that builds only placeholders, and turn each storage entry's position in the
zip into a byte offset, so each tensor becomes a Piece of the file: no tensor byte is read here and
torch is not imported.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

from mmrec.safetensors_format import DTYPE_SIZES

from .catalog import Piece, SourceError
from .paths import check_not_lfs_pointer

# torch storage class names -> safetensors dtype codes.
STORAGE_DTYPES = {
    "BFloat16Storage": "BF16", "HalfStorage": "F16", "FloatStorage": "F32", "DoubleStorage": "F64",
    "ByteStorage": "U8", "CharStorage": "I8", "ShortStorage": "I16", "IntStorage": "I32",
    "LongStorage": "I64", "BoolStorage": "BOOL", "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2", "UInt16Storage": "U16", "UInt32Storage": "U32", "UInt64Storage": "U64",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor found in the pickle: its storage and the view of it."""

    storage: _Storage
    storage_offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called without a storage")
    return LazyTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # an nn.Parameter saved directly: its data is all we need


class _Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the globals a state dict needs; anything else stops unpickling before it can run."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        return _Storage(str(key), stype.dtype, int(numel))


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_torch_zip(path: Path) -> list[tuple[str, str, tuple[int, ...], Piece]]:
    """(name, dtype, shape, piece) for every tensor of a torch.save zip file, in pickle order."""
    check_not_lfs_pointer(path)
    if not is_zip(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:  # a legacy torch.save file starts with a pickle opcode
            raise SourceError(f"{path}: not a torch.save file ({os.path.getsize(path)} bytes; neither a zip "
                              "archive nor a legacy pickle), or truncated")
        raise SourceError(f"{path}: is a legacy (non-zip) torch.save file, which cannot be read without "
                          "running its pickle; re-save it with torch >= 1.6 (torch.save default) or as "
                          "safetensors")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            pkl_names = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl_names) != 1:
                raise SourceError(f"{path}: zip file without exactly one '<name>/data.pkl': not a torch.save file")
            prefix = pkl_names[0][: -len("data.pkl")]
            byteorder = infos.get(prefix + "byteorder")
            if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
                raise SourceError(f"{path}: big-endian torch file; only little-endian is supported")
            raw = zf.read(pkl_names[0])
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: damaged or truncated zip file ({exc})") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None

    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise SourceError(f"{path}: refusing to unpickle '{exc.args[0]}': only tensors and plain containers "
                          "are allowed in a checkpoint") from None
    except Exception as exc:  # any malformed pickle: one clear message
        raise SourceError(f"{path}: cannot read data.pkl ({type(exc).__name__}: {exc})") from None

    state = _unwrap(obj)
    if state is None:
        raise SourceError(f"{path}: holds no state dict of tensors")
    with open(path, "rb") as f:
        offsets: dict[str, tuple[int, int]] = {}
        out = []
        for name, t in state.items():
            if not isinstance(t, LazyTensor):
                continue  # counters, config values and other non-tensors next to the weights
            key = t.storage.key
            if key not in offsets:
                offsets[key] = _data_offset(path, f, infos.get(f"{prefix}data/{key}"), key)
            start, size = offsets[key]
            itemsize = DTYPE_SIZES[t.storage.dtype]
            if t.storage.numel * itemsize > size:
                raise SourceError(f"{path}: storage {key} needs {t.storage.numel * itemsize} bytes but its "
                                  f"entry has {size}")
            numel = 1
            for d in t.shape:
                numel *= d
            if len(t.strides) != len(t.shape) or any(s < 0 for s in t.strides):
                raise SourceError(f"{path}: tensor '{name}': strides {t.strides} do not fit shape {t.shape}")
            last = t.storage_offset + sum((d - 1) * s for d, s in zip(t.shape, t.strides))
            if numel and (t.storage_offset < 0 or last >= t.storage.numel):
                raise SourceError(f"{path}: tensor '{name}' reaches element {last} of storage {key}, which "
                                  f"has {t.storage.numel}")
            piece = Piece(str(path), start + t.storage_offset * itemsize, t.shape, t.strides)
            out.append((str(name), t.storage.dtype, t.shape, piece))
    return out


def _unwrap(obj):
    """The state dict inside {"state_dict": ...} / {"model": ...} wrappers (nested ones too)."""
    for _ in range(8):
        if not isinstance(obj, dict):
            return None
        if any(isinstance(v, LazyTensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            return None
    return None


def _data_offset(path: Path, f, info: zipfile.ZipInfo | None, key: str) -> tuple[int, int]:
    """Absolute offset and size of a stored zip entry's bytes, from its local file header."""
    if info is None:
        raise SourceError(f"{path}: storage {key} is missing from the zip")
    if info.compress_type != zipfile.ZIP_STORED:
        raise SourceError(f"{path}: storage {key} is compressed; torch.save writes uncompressed entries")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise SourceError(f"{path}: bad local header for storage {key}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    file_size = os.fstat(f.fileno()).st_size
    if start + info.file_size > file_size:
        raise SourceError(f"{path}: storage {key} ends at byte {start + info.file_size}, past the end of the "
                          f"file ({file_size} bytes): the file is truncated")
    return start, info.file_size
