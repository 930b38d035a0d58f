"""Fuzzing the two parsers that read untrusted bytes before anything else: the safetensors header parser
(`mmrec/safetensors_format.py`) and the index reader (`open_source` on a `*.index.json`).

Whatever the bytes, the only outcomes allowed are a parsed result that keeps its promises or the
project's own clean error (one line naming the file). Never another exception, a hang (each example runs
under a 10 s alarm) or a large allocation (tracemalloc peak bounded by the input's size).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmrec.safetensors_format import DTYPE_SIZES, SafetensorsFormatError, read_header
from mmrec.streaming.sources import SourceError, open_source

# 200 fixed examples per test in CI; MMREC_FUZZ_EXAMPLES=20000 for a long random run.
_LONG = int(os.environ.get("MMREC_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 200, deadline=None, derandomize=not _LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def bounded(input_bytes: int, seconds: int = 10):
    """Fail on a hang (SIGALRM) or on allocating much more than the input itself."""
    def hang(signum, frame):
        raise AssertionError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < 4 * input_bytes + (2 << 20), f"peak allocation {peak} bytes for {input_bytes} input bytes"


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="mmrec-fuzz-") as d:
        yield Path(d)


def check_header(path: Path) -> None:
    """read_header either keeps its promises or raises SafetensorsFormatError naming the file."""
    size = path.stat().st_size
    with bounded(size):
        try:
            header = read_header(path)
        except SafetensorsFormatError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 1000, message
            return
    position = header.data_start
    assert 8 <= header.data_start <= header.file_size == size
    for span in header.tensors.values():  # in data order, contiguous, inside the file, sized by dtype
        assert span.start == position and span.end <= size
        assert span.nbytes == span.numel * DTYPE_SIZES[span.dtype]
        position = span.end
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def write_safetensors(path: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


# -- strategies ------------------------------------------------------------------------------------------------
small_int = st.integers(min_value=-3, max_value=70)
json_scalar = st.one_of(st.none(), st.booleans(), small_int, st.floats(allow_nan=False, width=32),
                        st.text(max_size=8), st.integers(min_value=2**62, max_value=2**70))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)

dtype = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["F42", "", "f32", "BF16 "]), json_value)
shape = st.one_of(st.lists(st.integers(min_value=0, max_value=9), max_size=4), st.lists(small_int, max_size=3),
                  json_value)
offsets = st.one_of(st.lists(st.integers(min_value=0, max_value=300), min_size=2, max_size=2),
                    st.lists(small_int, max_size=3), json_value)
entry = st.one_of(st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets}), json_value)
names = st.text(min_size=1, max_size=12)


@st.composite
def plausible_header(draw):
    """Headers that are often nearly valid: consistent offsets with a few things broken."""
    entries, offset = {}, 0
    for name in draw(st.lists(names, max_size=6, unique=True)):
        if name == "__metadata__":
            continue
        if draw(st.booleans()):
            code = draw(st.sampled_from(sorted(DTYPE_SIZES)))
            dims = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
            n = DTYPE_SIZES[code]
            for d in dims:
                n *= d
            begin = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
            entries[name] = {"dtype": code, "shape": dims, "data_offsets": [begin, begin + n]}
            offset = begin + n
        else:
            entries[name] = draw(entry)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                 max_size=2), json_value))
    text = json.dumps(entries).encode() + b" " * draw(st.integers(0, 9))
    data = b"\0" * max(0, offset + draw(st.sampled_from([0, 0, 0, -1, 1, -7])))
    return text, data


# -- the safetensors header parser --------------------------------------------------------------------------
@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"")
@example(raw=struct.pack("<Q", 2**64 - 1))
@example(raw=struct.pack("<Q", 4) + b"null")
@example(raw=b"version https://git-lfs.github.com/spec/v1\n")
def test_header_parser_on_arbitrary_bytes(workdir, raw):
    check_header(_write(workdir / "raw.safetensors", raw))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@FUZZ
@given(body=st.binary(max_size=200), length_delta=st.integers(-20, 20))
def test_header_parser_on_arbitrary_header_bodies(workdir, body, length_delta):
    check_header(write_safetensors(workdir / "body.safetensors", body, b"\0" * 16,
                                   length=max(0, len(body) + length_delta)))


@FUZZ
@given(header=plausible_header(), length_delta=st.sampled_from([0, 0, 0, 1, -1, 2**40, 2**63]))
@example(header=(b"[" * 50_000, b""), length_delta=0)
@example(header=(b'{"a":{"dtype":"F32","shape":[' + b"7" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4),
         length_delta=0)
@example(header=(json.dumps({"a": {"dtype": "U8", "shape": [2**62] * 64, "data_offsets": [0, 1]}}).encode(), b"\0"),
         length_delta=0)
@example(header=(json.dumps({"x" * 100_000: {"dtype": "U8", "shape": [1], "data_offsets": [0, 2]}}).encode(),
                 b"\0"), length_delta=0)
def test_header_parser_on_plausible_headers(workdir, header, length_delta):
    text, data = header
    check_header(write_safetensors(workdir / "plausible.safetensors", text, data, length=len(text) + length_delta))


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                 max_size=4))
def test_header_parser_on_damaged_real_files(family_checkpoints, workdir, cut, flips):
    """A real transformers-written shard, truncated and with a few bytes flipped."""
    real = sorted(family_checkpoints["gpt2"].glob("*.safetensors"))[0].read_bytes()[:20_000]
    damaged = bytearray(real[: max(0, len(real) - cut)])
    for position, mask in flips:
        if damaged:
            damaged[position % len(damaged)] ^= mask
    check_header(_write(workdir / "damaged.safetensors", bytes(damaged)))


# -- the index reader ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_dir(family_checkpoints, workdir):
    """A real sharded checkpoint (safetensors shards, no index) to point fuzzed indexes at."""
    d = workdir / "indexed"
    d.mkdir()
    for f in family_checkpoints["llama"].glob("*.safetensors"):
        shutil.copy(f, d / f.name)
    (workdir / "outside.safetensors").write_bytes((d / f.name).read_bytes())
    return d


def check_index(directory: Path, text: bytes) -> None:
    index = directory / "model.safetensors.index.json"
    index.write_bytes(text)
    with bounded(len(text) + 4096):
        try:
            catalog = open_source(index)
        except SourceError as exc:
            message = str(exc)
            assert "\n" not in message and str(directory) in message and len(message) < 1000, message
            return
    assert catalog.tensors and all(f.resolve().parent == directory.resolve() for f in catalog.files)


file_names = st.one_of(st.sampled_from(["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
                                        "../outside.safetensors", "/etc/hostname", "", ".", "..", "a\0b",
                                        "missing.safetensors", "model.safetensors.index.json"]),
                       st.text(max_size=10), json_value)


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b'{"weight_map": ' + b"[" * 50_000)
@example(raw=b'{"weight_map": {"a": 1' + b"0" * 5000 + b"}}")
def test_index_reader_on_arbitrary_bytes(index_dir, raw):
    check_index(index_dir, raw)


@FUZZ
@given(weight_map=st.one_of(st.dictionaries(st.text(max_size=30), file_names, max_size=5), json_value),
       real_names=st.booleans(), metadata=json_value)
def test_index_reader_on_fuzzed_weight_maps(index_dir, weight_map, real_names, metadata):
    if real_names and isinstance(weight_map, dict):  # mostly-real tensor names, so later checks run too
        real = list(read_header(sorted(index_dir.glob("*.safetensors"))[0]).tensors)
        weight_map = {real[i % len(real)] if i % 2 else k: v for i, (k, v) in enumerate(weight_map.items())}
    check_index(index_dir, json.dumps({"metadata": metadata, "weight_map": weight_map}).encode())
