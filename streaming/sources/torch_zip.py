"""Lazy reader for `torch.save` zip files (.pt/.pth/.bin) that never runs code from the pickle.

A torch zip holds `<prefix>/data.pkl` (the object tree; tensors as calls to `_rebuild_tensor_v2` on
persistent storage ids) and one stored (uncompressed) entry `<prefix>/data/<key>` per storage. We unpickle
`data.pkl` with the allowlist of globals that `torch.load(weights_only=True)` has (torch 2.x
`torch/_weights_only_unpickler.py`), but every allowed global resolves to a stand-in of ours: tensors
become placeholders that record their storage and view, and the other values torch allows (torch.Size,
dtypes, devices, bytes, bytearray, set, complex, OrderedDict, Counter, layouts, qschemes) become plain
Python values or inert markers. Any other global is refused before anything is called. Each storage
entry's position in the zip becomes a byte offset, so each tensor becomes a Piece of the file: no tensor
byte is read here and torch is not imported.

Why nothing from the pickle can run: `find_class` is the only way a pickle reaches a callable, and it
hands out only `_Call` wrappers of the functions below (which build plain values from plain arguments)
and non-callable markers. No class object is ever on the stack, so NEWOBJ fails, and BUILD (setstate) on
any of our objects is refused, so a pickle cannot patch a class or a function's defaults.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import math
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

from mmrec.safetensors_format import DTYPE_SIZES, TORCH_NAME_TO_CODE

from .catalog import Piece, SourceError
from .paths import check_not_lfs_pointer


class _Inert:
    """Base of everything the unpickler hands out: a pickle's BUILD (setstate) on it is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"a pickle may not set the state of {type(self).__name__.lstrip('_')}")


@dataclasses.dataclass(frozen=True)
class _Call(_Inert):
    """An allowed global that a pickle may call (REDUCE): `name` is the global, `fn` our stand-in."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class TorchValue(_Inert):
    """A torch object that is a plain value in a checkpoint (a dtype, qscheme, layout, device or class)."""

    kind: str  # "dtype", "qscheme", "layout", "device", "class"
    name: str  # "float16", "per_tensor_affine", "torch.sparse_coo", "cuda:0", "torch.Tensor"


@dataclasses.dataclass(frozen=True)
class _StorageType(_Inert):
    name: str  # the global, e.g. "torch.FloatStorage"
    dtype: str | None  # torch dtype name of its elements; None for TypedStorage (never in a storage id)
    itemsize: int


@dataclasses.dataclass(frozen=True)
class _Storage(_Inert):
    key: str
    dtype: str  # torch dtype name of its elements
    nbytes: int


@dataclasses.dataclass(frozen=True)
class LazyTensor(_Inert):
    """A dense tensor found in the pickle: its storage, the view of it and its element dtype."""

    storage: _Storage
    storage_offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str  # torch dtype name ("float32")


@dataclasses.dataclass(frozen=True)
class OtherTensor(_Inert):
    """A tensor torch can load but that is not one dense run of bytes (sparse, quantized, nested, meta...)."""

    kind: str


class _Refused(Exception):
    """A global (or an allowed global's argument) that torch.load(weights_only=True) would not accept."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(name, detail)
        self.name, self.detail = name, detail


# --- torch's weights-only allowlist, mirrored without importing torch -------------------------------
# The names are torch's `_get_allowed_globals()` keys; tests/test_torch_pickle_parity.py checks that this
# table and the installed torch's allowlist are the same set, and that the mappings below are torch's.

# torch.<X>Storage -> element dtype (torch.storage._dtype_to_storage_type_map, inverted)
_STORAGE_DTYPES = {
    "BFloat16": "bfloat16", "Bool": "bool", "Byte": "uint8", "Char": "int8", "ComplexDouble": "complex128",
    "ComplexFloat": "complex64", "Double": "float64", "Float": "float32", "Half": "float16", "Int": "int32",
    "Long": "int64", "Short": "int16",
}
_QUANTIZED_STORAGE_DTYPES = {"QInt32": "qint32", "QInt8": "qint8", "QUInt2x4": "quint2x4",
                             "QUInt4x2": "quint4x2", "QUInt8": "quint8"}
# Bytes per element of the dtypes a legacy storage can hold (DTYPE_SIZES covers the rest).
_EXTRA_ITEMSIZES = {"complex128": 16, "complex64": 8, "qint32": 4, "qint8": 1, "quint2x4": 1, "quint4x2": 1,
                    "quint8": 1}
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
_SPARSE_TENSOR_TYPES = tuple(t for t in _TENSOR_TYPES if t != "Bool")
# torch.storage._dtype_to_storage_type_map() and _new_dtypes(), and torch.uint1..7 / int1..7
_DTYPES = (
    *_STORAGE_DTYPES.values(), *_QUANTIZED_STORAGE_DTYPES.values(),
    "uint16", "uint32", "uint64", "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz",
    "float8_e8m0fnu", "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "complex32",
    *(f"uint{n}" for n in range(1, 8)), *(f"int{n}" for n in range(1, 8)),
)
_QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
             "per_channel_affine_float_qparams")
# torch._utils.IMPORT_MAPPING / NAME_MAPPING: Python 2 names torch renames before the allowlist lookup.
_IMPORT_MAPPING = {"__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue", "repr": "reprlib",
                   "_abcoll": "collections.abc", "UserDict": "collections", "UserList": "collections",
                   "UserString": "collections", "whichdb": "dbm", "StringIO": "io", "cStringIO": "io"}
_NAME_MAPPING = {
    ("__builtin__", "xrange"): ("builtins", "range"), ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"), ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"), ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"), ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"), ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"), ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"), ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}

# Encodings `_codecs.encode` / `bytearray` may name: the ones pickle writes (latin1 for bytes, latin-1 for
# bytearray) and their plain-text kin. Others could look codecs up (imports) or run a registered codec.
_TEXT_ENCODINGS = {"latin1": "latin-1", "latin-1": "latin-1", "iso-8859-1": "latin-1", "iso8859-1": "latin-1",
                   "l1": "latin-1", "utf-8": "utf-8", "utf8": "utf-8", "ascii": "ascii", "us-ascii": "ascii"}


def _text_encoding(global_name: str, encoding, errors) -> str:
    key = encoding.lower().replace("_", "-") if isinstance(encoding, str) else None
    if key not in _TEXT_ENCODINGS:
        raise _Refused(global_name, f"with encoding {encoding!r:.40} (only latin-1, utf-8 and ascii are read)")
    if errors not in (None, "strict"):
        raise _Refused(global_name, f"with errors={errors!r:.40} (only 'strict' is read)")
    return _TEXT_ENCODINGS[key]


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str):
        raise _Refused("_codecs.encode", f"of a {type(obj).__name__} (only text is read)")
    return obj.encode(_text_encoding("_codecs.encode", encoding, errors))


def _bytearray(source=b"", encoding=None, errors=None):
    if isinstance(source, str):
        return bytearray(source.encode(_text_encoding("builtins.bytearray", encoding, errors)))
    if encoding is not None or errors is not None:
        raise _Refused("builtins.bytearray", "with an encoding but no text")
    if isinstance(source, (bytes, bytearray)) or (
            isinstance(source, (list, tuple)) and all(type(b) is int for b in source)):
        return bytearray(source)  # a list of ints outside 0..255 raises ValueError: a bad pickle
    # bytearray(n) would allocate n bytes that the file does not hold; pickle never writes it
    raise _Refused("builtins.bytearray", f"of a {type(source).__name__} (only bytes, text or a list of ints)")


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"{what} is not a sequence of integers")
    return tuple(value)


def _size(dims=()):
    return _ints(dims, "torch.Size")


def _device(type_or_name, index=None):
    if not isinstance(type_or_name, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("torch.device of something other than a name and an index")
    return TorchValue("device", type_or_name if index is None else f"{type_or_name}:{index}")


def _get_layout(name):
    if not isinstance(name, str):
        raise pickle.UnpicklingError("torch.serialization._get_layout of something other than a name")
    return TorchValue("layout", name)


def _dtype_name(dtype) -> str:
    if not (isinstance(dtype, TorchValue) and dtype.kind == "dtype"):
        raise pickle.UnpicklingError("a tensor's dtype is not a torch dtype")
    return dtype.name


def _lazy(storage, storage_offset, size, stride, dtype: str | None) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor rebuilt without a storage")
    if type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError(f"a tensor's storage offset {storage_offset!r} is negative or not an integer")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if any(v < 0 for v in size + stride):  # torch never writes these; a size of -1 would be read as huge
        raise pickle.UnpicklingError(f"a tensor's size {list(size)} or stride {list(stride)} is negative")
    return LazyTensor(storage, storage_offset, size, stride, storage.dtype if dtype is None else dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _lazy(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _lazy(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    # dtypes without a legacy storage class (uint16, float8 ...): an untyped storage read as `dtype`
    return _lazy(storage, storage_offset, size, stride, _dtype_name(dtype))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # an nn.Parameter saved directly: its data is all we need


def _parameter(data=None, requires_grad=True):
    return data


def _rebuild_device_tensor_from_cpu_tensor(data, dtype, device, requires_grad):
    return data  # an xla/mtia/... tensor saved as a CPU copy: that copy is the data


def _other_tensor(kind: str) -> Callable[..., OtherTensor]:
    def rebuild(*args, **kwargs):
        return OtherTensor(kind)

    return rebuild


_TENSOR_REBUILDS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
    "torch._utils._rebuild_qtensor": _other_tensor("a quantized tensor"),
    "torch._utils._rebuild_sparse_tensor": _other_tensor("a sparse tensor"),
    "torch._utils._rebuild_nested_tensor": _other_tensor("a nested tensor"),
    "torch._utils._rebuild_meta_tensor_no_storage": _other_tensor("a meta tensor (no data)"),
    "torch._utils._rebuild_wrapper_subclass": _other_tensor("a tensor subclass without storage"),
    "torch._utils._rebuild_device_tensor_from_numpy": _other_tensor("a tensor rebuilt from numpy"),
}


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor with Python attributes (or a subclass torch allows): the tensor, attributes dropped."""
    if not (isinstance(func, _Call) and func.name in _TENSOR_REBUILDS and isinstance(args, tuple)):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor rebuild function")
    return func(*args)


def _allowed_globals() -> dict[str, _Inert]:
    table: dict[str, _Inert] = {
        "collections.OrderedDict": _Call("collections.OrderedDict", collections.OrderedDict),
        "collections.Counter": _Call("collections.Counter", collections.Counter),
        "builtins.set": _Call("builtins.set", set),
        "builtins.complex": _Call("builtins.complex", complex),
        "builtins.bytearray": _Call("builtins.bytearray", _bytearray),
        "_codecs.encode": _Call("_codecs.encode", _codecs_encode),
        "torch.Size": _Call("torch.Size", _size),
        "torch.device": _Call("torch.device", _device),
        "torch.serialization._get_layout": _Call("torch.serialization._get_layout", _get_layout),
        "torch.nn.parameter.Parameter": _Call("torch.nn.parameter.Parameter", _parameter),
        "torch._tensor._rebuild_from_type_v2": _Call("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
        "torch.Tensor": TorchValue("class", "torch.Tensor"),
        "torch.storage.UntypedStorage": _StorageType("torch.storage.UntypedStorage", "uint8", 1),
        "torch.storage.TypedStorage": _StorageType("torch.storage.TypedStorage", None, 0),
    }
    table.update({name: _Call(name, fn) for name, fn in _TENSOR_REBUILDS.items()})
    table.update({f"torch.{d}": TorchValue("dtype", d) for d in _DTYPES})
    table.update({f"torch.{q}": TorchValue("qscheme", q) for q in _QSCHEMES})
    for prefix, storages in (("torch.", {**_STORAGE_DTYPES, **_QUANTIZED_STORAGE_DTYPES}),
                             ("torch.cuda.", _STORAGE_DTYPES)):
        for kind, dtype in storages.items():
            name = f"{prefix}{kind}Storage"
            itemsize = _EXTRA_ITEMSIZES.get(dtype) or DTYPE_SIZES[TORCH_NAME_TO_CODE[dtype]]
            table[name] = _StorageType(name, dtype, itemsize)
    for prefix, kinds in (("torch.", _TENSOR_TYPES), ("torch.cuda.", _TENSOR_TYPES),
                          ("torch.sparse.", _SPARSE_TENSOR_TYPES), ("torch.cuda.sparse.", _SPARSE_TENSOR_TYPES)):
        table.update({f"{prefix}{k}Tensor": TorchValue("class", f"{prefix}{k}Tensor") for k in kinds})
    return table


ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """torch's weights-only allowlist, resolved to our stand-ins; anything else stops before it can run."""

    def __init__(self, file):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for Python 2 strings

    def find_class(self, module, name):
        if (module, name) in _NAME_MAPPING:  # as torch does, whatever the protocol
            module, name = _NAME_MAPPING[(module, name)]
        elif module in _IMPORT_MAPPING:
            module = _IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        found = ALLOWED_GLOBALS.get(full)
        if found is None:
            raise _Refused(full)
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], _StorageType) and pid[1].dtype is not None
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError("unexpected persistent id (not a storage)")
        _, stype, key, _location, numel = pid
        return _Storage(key, stype.dtype, numel * stype.itemsize)


MAX_TUPLE_NESTING = 1000


def _opcode_effects() -> dict[pickletools.OpcodeInfo, tuple[str, int, bool, int]]:
    """Per opcode: (what it does to the memo/tuples, items it pops below a mark, pops to a mark?, pushes)."""
    out = {}
    for op in pickletools.opcodes:
        kind = ("put" if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE") else
                "get" if op.name in ("GET", "BINGET", "LONG_BINGET") else
                "mark" if op.name == "MARK" else
                "tuple" if op.name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3") else "")
        before = op.stack_before
        to_mark = pickletools.markobject in before
        out[op] = (kind, before.index(pickletools.markobject) if to_mark else len(before), to_mark,
                   len(op.stack_after))
    return out


_OPCODE_EFFECTS = _opcode_effects()


def _check_tuple_nesting(raw: bytes) -> None:
    """Refuse tuples nested deeper than MAX_TUPLE_NESTING before unpickling.

    Hashing a tuple recurses in C without a depth check, so a 3 MB pickle of tuples nested a million deep,
    used as a dict key, crashes the interpreter (torch's loader too). Only tuples matter: the unpickler
    builds other nestings (lists, dicts) but never hashes through them. This walks the opcodes keeping the
    nesting depth of each stack item (memo included); it never builds an object."""
    depths: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    effects = _OPCODE_EFFECTS
    for op, arg, pos in pickletools.genops(raw):
        kind, below, to_mark, pushes = effects[op]
        if kind == "put":
            memo[len(memo) if arg is None else arg] = depths[-1] if depths else 0
            continue
        if kind == "get":
            depths.append(memo.get(arg, 0))
            continue
        if kind == "mark":
            marks.append(len(depths))
            continue
        deepest = 0
        if to_mark:
            start = marks.pop() if marks else 0
            if start < len(depths):
                deepest = max(depths[start:])
                del depths[start:]
        for _ in range(min(below, len(depths))):
            deepest = max(deepest, depths.pop())
        if kind == "tuple":
            deepest += 1
            if deepest > MAX_TUPLE_NESTING:
                raise pickle.UnpicklingError(f"tuples nested more than {MAX_TUPLE_NESTING} deep (at byte {pos})")
        depths.extend([deepest] * pushes)


def load_data_pkl(raw: bytes):
    """The object tree of a torch zip's data.pkl, built from stand-ins (see the module docstring).

    Raises `_Refused` for a global torch.load(weights_only=True) refuses, or whatever a malformed pickle
    raises (pickle.UnpicklingError, ValueError, TypeError ...)."""
    _check_tuple_nesting(raw)
    return _RestrictedUnpickler(io.BytesIO(raw)).load()


# data.pkl holds the object tree only (tensor bytes live in other entries): a few hundred bytes per tensor.
# 256 MiB (about a million tensors) is far above any real checkpoint's, and keeps a compressed entry (a
# "zip bomb") from inflating further.
MAX_PICKLE_BYTES = 256 << 20
# DEFLATE cannot expand a byte by more than 1032x; a stated size beyond that is a lie about the entry.
MAX_DEFLATE_RATIO = 1032


def _read_entry(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The bytes of one zip entry, its stated size checked against `limit` and against what the archive's
    real size can hold before anything is decompressed, then read with a bounded reader (never more than
    the stated size plus one byte, so an entry whose stream is longer than it says is refused too)."""
    archive_size = os.path.getsize(path)
    stored = info.compress_type == zipfile.ZIP_STORED
    can_hold = archive_size if stored else archive_size * MAX_DEFLATE_RATIO
    if info.file_size > limit or info.file_size > can_hold or info.compress_size > archive_size:
        raise SourceError(f"{path}: zip entry '{info.filename[:200]}' says it holds {info.file_size} bytes "
                          f"({info.compress_size} compressed), more than the {limit}-byte limit for it or "
                          f"than an archive of {archive_size} bytes can hold; refusing to decompress it")
    with zf.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise SourceError(f"{path}: zip entry '{info.filename[:200]}' holds other than the {info.file_size} "
                          "bytes it states; the file is damaged")
    return data


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
            if byteorder is not None and _read_entry(path, zf, byteorder, 64).strip() not in (b"little", b""):
                raise SourceError(f"{path}: big-endian torch file; only little-endian is supported")
            raw = _read_entry(path, zf, infos[pkl_names[0]], MAX_PICKLE_BYTES)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: damaged or truncated zip file ({exc})") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None

    try:
        obj = load_data_pkl(raw)
    except _Refused as exc:
        what = f"'{exc.name}'" + (f" {exc.detail}" if exc.detail else "")
        hint = ("; convert numpy values with .item() or .tolist() before torch.save"
                if exc.name.startswith("numpy") else "")
        raise SourceError(f"{path}: refusing to unpickle {what}: a checkpoint may hold only tensors and the "
                          f"plain values torch.load(weights_only=True) accepts{hint}") from None
    except Exception as exc:  # any malformed pickle: one clear message
        raise SourceError(f"{path}: cannot read data.pkl ({type(exc).__name__}: {exc})") from None

    state = _unwrap(obj)
    if state is None:
        raise SourceError(f"{path}: holds no state dict of tensors")
    with open(path, "rb") as f:
        offsets: dict[str, tuple[int, int]] = {}
        out = []
        for name, t in dict.items(state):  # dict's own method: a pickle may shadow an instance's
            if isinstance(t, OtherTensor):
                raise SourceError(f"{path}: tensor '{name}' is {t.kind}, which is not one dense block of bytes; "
                                  "save it as a dense tensor (.to_dense(), .dequantize(), ...)")
            if not isinstance(t, LazyTensor):
                continue  # counters, config values and other non-tensors next to the weights
            code = TORCH_NAME_TO_CODE.get(t.dtype)
            if code is None:
                raise SourceError(f"{path}: tensor '{name}' has dtype torch.{t.dtype}, which is not supported "
                                  f"(supported: {', '.join(TORCH_NAME_TO_CODE)})")
            itemsize = DTYPE_SIZES[code]
            key = t.storage.key
            if key not in offsets:
                offsets[key] = _data_offset(path, f, infos.get(f"{prefix}data/{key}"), key)
            start, size = offsets[key]
            if t.storage.nbytes > size:
                raise SourceError(f"{path}: storage {key} needs {t.storage.nbytes} bytes but its entry has {size}")
            numel = math.prod(t.shape)
            if len(t.strides) != len(t.shape):  # (negative sizes and strides were refused when unpickled)
                raise SourceError(f"{path}: tensor '{name}': strides {t.strides} do not fit shape {t.shape}")
            if any(s == 0 and d > 1 for d, s in zip(t.shape, t.strides)):  # its size would come from a number
                raise SourceError(f"{path}: tensor '{name}' repeats its bytes (a zero stride: an expand()ed view "
                                  f"of shape {t.shape}); save it with .contiguous()")
            last = t.storage_offset + sum((d - 1) * s for d, s in zip(t.shape, t.strides))
            if numel and (t.storage_offset < 0 or (last + 1) * itemsize > t.storage.nbytes):
                raise SourceError(f"{path}: tensor '{name}' reaches byte {(last + 1) * itemsize} of storage "
                                  f"{key}, which has {t.storage.nbytes}")
            piece = Piece(str(path), start + t.storage_offset * itemsize, t.shape, t.strides)
            out.append((str(name), code, t.shape, piece))
    return out


def _unwrap(obj, depth: int = 8):
    """The state dict inside {"state_dict": ...} / {"model": ...} wrappers (nested ones too).

    A wrapper key holding a state dict wins over tensors beside it ({"model": {...}, "ema_decay": tensor}),
    so a stray tensor next to the weights is not taken for the weights."""
    if depth == 0 or not isinstance(obj, dict):
        return None
    for key in ("state_dict", "model", "module", "model_state_dict"):
        inner = _unwrap(dict.get(obj, key), depth - 1)  # dict's own methods: a BUILD may shadow the object's
        if inner is not None:
            return inner
    if any(isinstance(v, (LazyTensor, OtherTensor)) for v in dict.values(obj)):
        return obj
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
