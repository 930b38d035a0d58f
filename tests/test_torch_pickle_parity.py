"""Parity of our restricted unpickler (streaming/sources/torch_zip.py) with torch.load(weights_only=True).

Every file here is written by torch.save (or is a torch.save file whose data.pkl was swapped for a
hand-assembled one); the reference is always the installed torch's own weights-only loader. What torch
accepts, we accept, listing the same state-dict tensors with the same bytes; what torch refuses, we refuse
with one message naming the file and the global; and no payload ever runs.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._utils
from torch._weights_only_unpickler import _get_allowed_globals

from mmrec.streaming.sources import SourceError, open_source
from mmrec.streaming.sources import torch_zip
from mmrec.streaming.sources.torch_zip import OtherTensor, TorchValue, load_data_pkl

TORCH_ALLOWED = sorted(_get_allowed_globals())


# --- helpers -----------------------------------------------------------------------------------------

def make_state() -> dict[str, torch.Tensor]:
    """A small state dict covering the v2 (legacy storage) and v3 (untyped storage) rebuild paths."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(7, generator=g).to(torch.float16),
        "emb.weight": torch.randint(-1000, 1000, (5, 2), generator=g),
        "transposed": base.t(),  # strides (1, 5)
        "row_view": base[2:5],  # a storage offset
        "f8": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3 + UntypedStorage
        "u16": torch.randint(0, 60000, (4,), generator=g).to(torch.uint16),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(path: Path, state_key: str = "model") -> None:
    """torch.load(weights_only=True) accepts `path`, and open_source lists exactly its state dict's tensors,
    with the same dtype, shape and bytes (whole and as row blocks)."""
    loaded = torch.load(path, weights_only=True)
    if state_key:
        reference = loaded[state_key]
    else:  # a bare state dict: torch keeps its non-tensor values, we skip them
        reference = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    catalog = open_source(path)
    try:
        assert {t.original_name for t in catalog.tensors.values()} == set(reference)
        for name, t in catalog.tensors.items():
            ref = reference[t.original_name]
            got = catalog.read(name, 0, t.shape[0]) if t.shape else catalog.read(name)
            assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape) == t.shape, name
            assert as_bytes(got) == as_bytes(ref), name
            if ref.ndim and ref.shape[0] >= 2:  # row blocks through the catalog's slicing
                half = ref.shape[0] // 2
                assert as_bytes(catalog.read(name, half, ref.shape[0])) == as_bytes(ref[half:]), name
    finally:
        catalog.close()


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        [name] = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)


def replace_data_pkl(path: Path, raw: bytes) -> None:
    """Rewrite a torch.save zip with another data.pkl, every other entry (records, storages) kept."""
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(name, raw if name.endswith("/data.pkl") else data)


def with_item(path: Path, key: str, value_ops: bytes) -> None:
    """Add `key: <value built by value_ops>` to the top-level dict of a torch.save({...}) file's data.pkl.

    torch.save (protocol 2) ends the dict with SETITEM(S) and STOP, leaving the dict on top of the stack,
    so BINUNICODE key + value ops + SETITEM before STOP adds one more item."""
    raw = data_pkl(path)
    assert raw.endswith(b".") and raw[-2:-1] in (b"s", b"u"), raw[-2:]
    k = key.encode()
    replace_data_pkl(path, raw[:-1] + b"X" + struct.pack("<I", len(k)) + k + value_ops + b"s.")


def global_op(full_name: str) -> bytes:
    module, name = full_name.rsplit(".", 1)
    return b"c" + f"{module}\n{name}\n".encode()


def torch_refuses(path: Path, global_: str | None = None) -> str:
    """torch.load(weights_only=True) refuses `path` (naming `global_`, spelt as torch spells it)."""
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(path, weights_only=True)
    message = str(info.value)
    if global_ is not None:
        spelt = global_.removeprefix("builtins.")  # torch writes builtins.exec as "exec"
        assert f"GLOBAL {spelt} was not an allowed global" in message or (  # or, for sys/os/posix/nt:
            f"GLOBAL {spelt} whose module {global_.split('.')[0]} is blocked" in message), message
    return message


def we_refuse(path: Path, *fragments: str) -> str:
    with pytest.raises(SourceError) as info:
        open_source(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def global_name(obj) -> str:
    """The name pickle writes for a function or class (as torch reports it)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def torch_plain(value):
    """torch's loaded value in the form our unpickler builds it (plain Python where torch's is not)."""
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, torch.dtype):
        return TorchValue("dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return TorchValue("device", str(value))
    if isinstance(value, torch.layout):
        return TorchValue("layout", str(value))
    if isinstance(value, torch.qscheme):
        return TorchValue("qscheme", str(value).removeprefix("torch."))
    if isinstance(value, type) and issubclass(value, torch.Tensor):
        return TorchValue("class", global_name(value).replace("torch._tensor.", "torch."))
    if isinstance(value, dict):  # dict, OrderedDict, Counter: same type, same order
        out = type(value)()
        for k, v in value.items():
            out[k] = torch_plain(v)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(torch_plain(v) for v in value)
    return value


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# --- extras torch accepts: we accept them, build the same plain values, list the same tensors ---------

def _tensor_with_attribute():
    t = torch.arange(4.0)
    t.note = "kept by torch, dropped by us"  # pickled through torch._tensor._rebuild_from_type_v2
    return t


EXTRAS = {
    "torch.Size": lambda: torch.Size([2, 3]),
    "empty torch.Size": lambda: torch.Size([]),
    "dtype float16": lambda: torch.float16,
    "dtype float8 and uint16": lambda: [torch.float8_e4m3fn, torch.uint16],
    "device cpu": lambda: torch.device("cpu"),
    "device cuda:1": lambda: torch.device("cuda", 1),
    "OrderedDict": lambda: collections.OrderedDict([("b", 1), ("a", [2, 3])]),
    "set": lambda: {1, "two", (3, 4)},
    "empty set": lambda: set(),
    "nested tuple and dict": lambda: {"a": (1, (2.5, "x", ())), "b": {"c": [None, True, False]}},
    "bytes": lambda: b"\x00\xffab\x80",
    "bytearray": lambda: bytearray(b"xy\x00\xfe"),
    "empty bytearray": lambda: bytearray(),
    "None": lambda: None,
    "big ints": lambda: [2**100, -(2**70), 2**31, -1],
    "inf and nan": lambda: [float("inf"), float("-inf"), float("nan"), -0.0],
    "complex": lambda: 1.5 - 2j,
    "Counter": lambda: collections.Counter("abracadabra"),
    "unicode str": lambda: "héllo \u2603 \U0001f600",
    "layout sparse_coo": lambda: torch.sparse_coo,
    "qscheme": lambda: torch.per_channel_affine,
    "class torch.Tensor": lambda: torch.Tensor,
    "training state": lambda: {"epoch": 3, "step": 10_000, "lr": 3e-4, "best": float("inf"),
                               "args": {"betas": (0.9, 0.999), "dtype": torch.bfloat16, "seed": None}},
}
# Tensors torch accepts next to the weights; we accept them and ignore them (they are not the state dict).
TENSOR_EXTRAS = {
    "optimizer state tensors": lambda: {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 3)}},
                                        "param_groups": [{"lr": 0.1, "params": [0]}]},
    "complex64 tensor": lambda: torch.zeros(2, dtype=torch.complex64),
    "sparse tensor": lambda: torch.eye(3).to_sparse(),
    "quantized tensor": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
    "meta tensor": lambda: torch.empty(2, 3, device="meta"),
    "nested tensor": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    "tensor with an attribute": _tensor_with_attribute,
    "Parameter": lambda: torch.nn.Parameter(torch.ones(2)),
}


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_extra_value_accepted_like_torch(tmp_path, kind):
    value = EXTRAS[kind]()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_state(), "extra": value}, path)
    assert_same_tensors(path)  # torch.load(weights_only=True) accepts it; same tensors, same bytes
    ours = load_data_pkl(data_pkl(path))["extra"]
    theirs = torch_plain(torch.load(path, weights_only=True)["extra"])
    assert same(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("kind", list(TENSOR_EXTRAS))
def test_tensor_extras_accepted_like_torch_and_left_out(tmp_path, kind):
    path = tmp_path / "ckpt.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized / nested tensors warn that they are deprecated / prototype
        torch.save({"state_dict": make_state(), "extra": TENSOR_EXTRAS[kind](), "step": 7}, path)
        assert_same_tensors(path, "state_dict")


def test_state_dict_at_top_level_with_extras_inside(tmp_path):
    """A bare state dict (no wrapper) that also holds non-tensor values: those are not tensors, torch keeps
    them and we skip them."""
    state = make_state()
    path = tmp_path / "pytorch_model.bin"
    torch.save({**state, "version": torch.Size([1, 2]), "dtype": torch.float16, "ids": {1, 2}}, path)
    loaded = torch.load(path, weights_only=True)
    catalog = open_source(path)
    assert {t.original_name for t in catalog.tensors.values()} == {k for k, v in loaded.items()
                                                                   if isinstance(v, torch.Tensor)} == set(state)
    catalog.close()


def test_state_dict_tensors_with_attributes_and_parameters(tmp_path):
    """Tensors pickled through _rebuild_from_type_v2 and _rebuild_parameter(_with_state) inside the state dict."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.tag = "x"  # a Parameter with state: _rebuild_parameter_with_state
    state = {"plain": torch.randn(5), "attr": _tensor_with_attribute(), "param": p,
             "frozen": torch.nn.Parameter(torch.arange(6).reshape(2, 3), requires_grad=False)}
    torch.save({"model": state}, tmp_path / "m.pt")
    assert_same_tensors(tmp_path / "m.pt")


def test_every_dtype_safetensors_stores(tmp_path):
    """Legacy typed storages (_rebuild_tensor_v2) and untyped ones (_rebuild_tensor_v3: uint16/32/64, float8)."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                  torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                  torch.float8_e4m3fn, torch.float8_e5m2):
        high = 2 if dtype == torch.bool else 256  # any bit pattern, but a bool byte is 0 or 1
        raw = torch.randint(0, high, (3 * 4 * dtype.itemsize,), dtype=torch.uint8, generator=g)
        state[str(dtype)] = raw.view(dtype).reshape(3, 4)[:, 1:]  # non-contiguous, offset views
    torch.save({"model": state}, tmp_path / "all.pt")
    assert_same_tensors(tmp_path / "all.pt")


@pytest.mark.parametrize("name", TORCH_ALLOWED)
def test_every_global_torch_allows_is_accepted(tmp_path, name):
    """Each global of the installed torch's weights-only allowlist, as a bare value next to the weights."""
    path = tmp_path / "g.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    with_item(path, "g", global_op(name))
    assert_same_tensors(path, "")  # torch accepts; we list the same tensor "w"
    assert name in torch_zip.ALLOWED_GLOBALS


def test_allowlist_and_name_mappings_are_torchs():
    """The mirrored allowlist is exactly torch's (no more, no less) and Python 2 names map as torch maps them."""
    assert set(torch_zip.ALLOWED_GLOBALS) == set(TORCH_ALLOWED)
    assert torch_zip._IMPORT_MAPPING == torch._utils.IMPORT_MAPPING
    assert torch_zip._NAME_MAPPING == torch._utils.NAME_MAPPING
    for dtype in torch.storage._dtype_to_storage_type_map():
        storage = torch_zip.ALLOWED_GLOBALS[f"torch.{torch.storage._dtype_to_storage_type_map()[dtype]}"]
        assert storage.dtype == str(dtype).removeprefix("torch.") and storage.itemsize == dtype.itemsize


# --- what torch refuses, we refuse: one message naming the file and the global -----------------------

class Custom:
    def __init__(self):
        self.x = 1


REFUSED_VALUES = {
    "numpy float64": lambda: np.float64(1.5),
    "numpy int64": lambda: np.int64(3),
    "numpy array": lambda: np.arange(4),
    "frozenset": lambda: frozenset({1, 2}),
    "slice": lambda: slice(1, 5, 2),
    "range": lambda: range(3),
    "empty bytes": lambda: b"",  # protocol 2 writes builtins.bytes() for it, which torch refuses
    "defaultdict": lambda: collections.defaultdict(int),
    "custom class": Custom,
    "a function": lambda: os.getcwd,
}


def _first_global(raw: bytes) -> str:
    """The first global a pickle names that torch's allowlist lacks (after torch's Python 2 renames)."""
    import pickletools

    for op, arg, _ in pickletools.genops(raw):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            module, name = torch._utils.NAME_MAPPING.get((module, name), (module, name))
            module = torch._utils.IMPORT_MAPPING.get(module, module)
            if f"{module}.{name}" not in TORCH_ALLOWED:
                return f"{module}.{name}"
    raise AssertionError("no refused global in the pickle")


@pytest.mark.parametrize("kind", list(REFUSED_VALUES))
def test_values_torch_refuses_are_refused(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": make_state(), "extra": REFUSED_VALUES[kind]()}, path)
    bad = _first_global(data_pkl(path))
    torch_refuses(path, bad)
    message = we_refuse(path, f"refusing to unpickle '{bad}'", "torch.load(weights_only=True)")
    if bad.startswith("numpy"):
        assert ".item()" in message


class Payload:
    """Unpickling this calls `fn(*args)`; each args creates the marker file when run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


PAYLOADS = {
    "os.system": lambda m: Payload(os.system, f"touch '{m}'"),
    "open": lambda m: Payload(open, str(m), "w"),
    "exec": lambda m: Payload(exec, f"open({str(m)!r}, 'w').close()"),
    "eval": lambda m: Payload(eval, f"open({str(m)!r}, 'w').close()"),
    "Path.touch": lambda m: Payload(Path.touch, Path(m)),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payload_refused_by_both_and_never_runs(tmp_path, kind):
    marker = tmp_path / "marker"
    payload = PAYLOADS[kind](marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": make_state(), "extra": payload}, path)
    bad = _first_global(data_pkl(path))  # os.system is posix.system; Path.touch goes through getattr
    torch_refuses(path, bad)
    we_refuse(path, f"refusing to unpickle '{bad}'")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_build_cannot_patch_an_allowed_function(tmp_path):
    """BUILD with slot state on an allowed global would set attributes (e.g. __defaults__) on our stand-in
    and change how later files are read. torch refuses BUILD on a function; so do we, and nothing changed."""
    path = tmp_path / "patch.pt"
    torch.save({"w": torch.ones(3)}, path)
    before = torch_zip._rebuild_tensor_v2.__defaults__
    # GLOBAL; state (None, {"__defaults__": (True,)}); BUILD
    patch = (global_op("torch._utils._rebuild_tensor_v2") + b"N}X\x0c\x00\x00\x00__defaults__\x88\x85s\x86b")
    with_item(path, "patched", patch)
    torch_refuses(path)
    we_refuse(path, "cannot read data.pkl", "may not set the state")
    assert torch_zip._rebuild_tensor_v2.__defaults__ == before
    assert torch_zip.ALLOWED_GLOBALS["torch._utils._rebuild_tensor_v2"].fn is torch_zip._rebuild_tensor_v2


def test_no_class_reaches_the_stack(tmp_path):
    """NEWOBJ needs a class; every allowed global is a stand-in instance, so a crafted NEWOBJ stops."""
    path = tmp_path / "newobj.pt"
    torch.save({"w": torch.ones(3)}, path)
    with_item(path, "c", global_op("collections.Counter") + b")\x81")  # Counter.__new__(Counter)
    torch.load(path, weights_only=True)  # torch allows NEWOBJ of an allowed class ...
    we_refuse(path, "cannot read data.pkl", "NEWOBJ")  # ... we never hand out a class


def test_codecs_encode_only_text_encodings(tmp_path):
    """_codecs.encode is allowed for the bytes pickle writes (latin1); a codec by name is not run."""
    path = tmp_path / "codec.pt"
    torch.save({"w": torch.ones(3)}, path)
    with_item(path, "b", global_op("_codecs.encode") + b"X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R")
    torch.load(path, weights_only=True)  # torch runs the rot13 codec
    we_refuse(path, "refusing to unpickle '_codecs.encode' with encoding 'rot13'")


@pytest.mark.parametrize("kind", ["sparse", "quantized", "meta", "complex64"])
def test_state_dict_tensor_without_plain_bytes_is_named(tmp_path, kind):
    """torch loads these, but they are not one dense block of a dtype we convert: the message names the
    tensor (where before the whole file was refused for its global)."""
    make = {"sparse": lambda: torch.eye(3).to_sparse(),
            "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
            "meta": lambda: torch.empty(2, device="meta"),
            "complex64": lambda: torch.zeros(2, dtype=torch.complex64)}[kind]
    path = tmp_path / "odd.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"model": {"ok": torch.ones(2), "odd": make()}}, path)
    torch.load(path, weights_only=True)
    message = we_refuse(path, "tensor 'odd'")
    assert ("complex64" in message) if kind == "complex64" else ("dense" in message)
    parsed = load_data_pkl(data_pkl(path))["model"]["odd"]
    assert isinstance(parsed, OtherTensor) == (kind != "complex64")


def test_higher_pickle_protocols_still_read(tmp_path):
    """Protocol 4/5 opcodes (FRAME, SHORT_BINUNICODE, STACK_GLOBAL ...) build no objects and run nothing;
    torch's weights-only loader does not implement them, we keep reading such files as before."""
    state = make_state()
    for protocol in (3, 4, 5):
        path = tmp_path / f"p{protocol}.pt"
        torch.save({"model": state, "extra": torch.Size([1]), "b": b"x"}, path, pickle_protocol=protocol)
        catalog = open_source(path)
        assert {t.original_name for t in catalog.tensors.values()} == set(state)
        for t in catalog.tensors.values():
            got = catalog.read(t.name, 0, t.shape[0]) if t.shape else catalog.read(t.name)
            assert as_bytes(got) == as_bytes(state[t.original_name])
        catalog.close()


def test_module_state_dict_with_metadata(tmp_path):
    """nn.Module.state_dict() is an OrderedDict whose `_metadata` attribute is pickled with BUILD: allowed on
    an OrderedDict, by torch and by us."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 2))
    state = model.state_dict()
    assert hasattr(state, "_metadata")
    torch.save({"model": state, "config": {"hidden": 3, "dtype": torch.float32}}, tmp_path / "m.pt")
    assert_same_tensors(tmp_path / "m.pt")
    assert load_data_pkl(data_pkl(tmp_path / "m.pt"))["model"]._metadata == state._metadata


def test_deeply_nested_tuple_key_is_one_error(tmp_path):
    """A dict key of tuples nested a million deep: hashing it recurses in C with no depth check and kills
    the interpreter (plain pickle and torch's loader alike). We refuse it before unpickling; a tuple nested
    at the limit still reads."""
    path = tmp_path / "deep.pt"
    torch.save({"w": torch.ones(3)}, path)
    ok = data_pkl(path)
    limit = torch_zip.MAX_TUPLE_NESTING
    # ()  TUPLE1 x n  as the key, K 1 as the value, SETITEM, STOP
    replace_data_pkl(path, ok[:-1] + b")" + b"\x85" * (limit - 1) + b"K\x01s.")
    assert_same_tensors(path, "")
    replace_data_pkl(path, ok[:-1] + b")" + b"\x85" * 1_000_000 + b"K\x01s.")
    we_refuse(path, "cannot read data.pkl", f"tuples nested more than {limit} deep")
    # the same depth reached through the memo (GET t; TUPLE1; PUT t, repeated) is counted too
    replace_data_pkl(path, ok[:-1] + b")q\x7f" + b"h\x7f\x85q\x7f" * (limit + 1) + b"K\x01s.")
    we_refuse(path, f"tuples nested more than {limit} deep")


def test_an_expanded_view_is_refused_not_sized_from_its_shape(tmp_path):
    """A zero stride makes a tensor's size a number in the file, not bytes in it: refused by name."""
    from mmrec.streaming.sources import SourceError, open_source

    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.ones(4, dtype=torch.float32), "big": torch.zeros(1, 4).expand(100_000, 4)}, path)
    assert torch.load(path, weights_only=True)["big"].shape == (100_000, 4)  # torch reads it as a view
    with pytest.raises(SourceError, match=r"tensor 'big' repeats its bytes \(a zero stride"):
        open_source(path)
