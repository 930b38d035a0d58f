"""Tensors whose init rule is zeros are never written (streaming/tasks.py): their range is punched as a hole
(or, where that cannot be done, written as zeros), and their checksum pieces are the digests of zeros. They
must read back as zeros even over a partial file full of stale bytes from an interrupted run."""

from __future__ import annotations

import ctypes
import math
import errno
import json
import os
from pathlib import Path

import pytest
import xxhash
from typer.testing import CliRunner

from mmrec.cli.app import app
from mmrec.safetensors_format import read_header
from mmrec.streaming import graph, tasks
from mmrec.streaming.checksums import file_checksum, piece_rows
from mmrec.streaming.plan.model import TensorPlan
from mmrec.streaming.synthetic import write_synthetic_llama

REPORT = "conversion_report.json"


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("zeros-src") / "tiny", "tiny", "BF16")


@pytest.fixture(scope="module")
def zero_tensors(tiny_llama) -> dict[str, dict]:
    """The plan's zero-init tensors (as `mmrec plan --json` shows them) under the default init mode."""
    result = cli("plan", tiny_llama, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    zeros = {t["name"]: t for t in plan["tensors"] if t["kind"] == "init" and t["init"] == "zeros"}
    assert "blocks.0.W_z.weight" in zeros and "blocks.0.W_q.bias" in zeros  # a matrix and a vector
    return zeros


def _reference_digests(nbytes: int, row_bytes: int) -> list[bytes]:
    piece = piece_rows(row_bytes) * row_bytes
    if nbytes == 0:
        return [xxhash.xxh3_128(b"").digest()]
    return [xxhash.xxh3_128(bytes(min(piece, nbytes - i))).digest() for i in range(0, nbytes, piece)]


def _write_zero_tensor(partial: Path, tensor: dict, offset: int, task_bytes: int = 128 << 20) -> list[bytes]:
    shape = tensor["shape"]
    row_bytes = 2 * (shape[1] if len(shape) > 1 else 1)
    digests = []
    for a, b in graph.task_row_ranges(shape[0], row_bytes, task_bytes):
        task = tasks.WriteTask(str(partial), tensor, offset, row_bytes, a, b, "", "", 0, 1 << 20, None)
        digests += tasks.write_rows(task)
    return digests


def _no_fallocate(monkeypatch):
    """As on a system without fallocate: _zero_range must write the zeros itself."""
    monkeypatch.setattr(tasks, "_linux_libc", lambda: None)
    monkeypatch.setattr(tasks, "COPY_BLOCK", 1000)  # several zero blocks, the last one short


@pytest.mark.parametrize("how", ["punched", "written"])
@pytest.mark.parametrize("name", ["blocks.0.W_z.weight", "blocks.1.multi_mem_attention.W_o.weight",
                                  "blocks.0.W_q.bias", "blocks.1.ffn.0.bias"])
def test_zero_tensor_over_stale_bytes_reads_zeros(zero_tensors, tmp_path, monkeypatch, name, how):
    if how == "written":
        _no_fallocate(monkeypatch)
    tensor = zero_tensors[name]
    assert tensor["dtype"] == "BF16"
    nbytes = 2 * int(math.prod(tensor["shape"]))
    header, offset, tail = b"{}" + b" " * 4093, 4095 + 333, 1001  # the tensor starts and ends mid-block
    partial = tmp_path / "shard.partial"
    partial.write_bytes(b"\xff" * (offset + nbytes + tail + 5000))  # an older, longer partial file
    tasks.prepare_shard(str(partial), header, offset + nbytes + tail)
    digests = _write_zero_tensor(partial, tensor, offset)
    data = partial.read_bytes()
    assert len(data) == offset + nbytes + tail
    assert data[offset:offset + nbytes] == bytes(nbytes)
    assert data[:len(header)] == header
    assert data[len(header):offset] == b"\xff" * (offset - len(header))  # others' bytes are left alone
    assert data[offset + nbytes:] == b"\xff" * tail
    row_bytes = nbytes // tensor["shape"][0]
    assert digests == _reference_digests(nbytes, row_bytes)
    assert tasks.combine_checksums([digests]) == file_checksum(str(partial), offset, offset + nbytes, row_bytes)


def _blocks_are_informative(directory: Path) -> str | None:
    """Why st_blocks cannot show holes here (None when it can)."""
    probe = directory / "probe"
    with open(probe, "wb") as f:
        f.write(b"\xff" * (4 << 20))
        f.flush()
        os.fsync(f.fileno())
    if probe.stat().st_blocks * 512 < (4 << 20):
        return "st_blocks does not count written data on this filesystem"
    fd = os.open(probe, os.O_WRONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(fd, 0x01 | 0x02, 0, 4 << 20) != 0:  # KEEP_SIZE | PUNCH_HOLE
            return f"this filesystem cannot punch holes ({os.strerror(ctypes.get_errno())})"
    except (OSError, AttributeError) as exc:
        return f"no fallocate ({exc})"
    finally:
        os.close(fd)
    if probe.stat().st_blocks * 512 >= (1 << 20):
        return "st_blocks does not shrink when a hole is punched here"
    probe.unlink()
    return None


def test_a_big_zero_tensor_allocates_no_blocks(tmp_path):
    why = _blocks_are_informative(tmp_path)
    if why:
        pytest.skip(why)
    shape = (8192, 2048)  # 32 MiB of bf16: two checksum pieces
    tensor = TensorPlan("blocks.0.W_z.weight", "BF16", shape, "init", [], [], "zeros").to_dict()
    nbytes, offset = shape[0] * shape[1] * 2, 4096
    fresh = tmp_path / "fresh.partial"
    tasks.prepare_shard(str(fresh), b"h" * offset, offset + nbytes)
    digests = _write_zero_tensor(fresh, tensor, offset, task_bytes=16 << 20)  # two tasks
    assert fresh.stat().st_size == offset + nbytes
    assert fresh.stat().st_blocks * 512 < (1 << 20)
    assert digests == _reference_digests(nbytes, shape[1] * 2) and len(digests) == 2
    # over a partial file whose bytes are all allocated (an interrupted run's), the blocks are given back
    stale = tmp_path / "stale.partial"
    with open(stale, "wb") as f:
        for _ in range(offset + nbytes >> 20):
            f.write(b"\xff" * (1 << 20))
        f.write(b"\xff" * (offset + nbytes & ((1 << 20) - 1)))
        os.fsync(f.fileno())
    assert stale.stat().st_blocks * 512 >= nbytes
    tasks.prepare_shard(str(stale), b"h" * offset, offset + nbytes)
    assert _write_zero_tensor(stale, tensor, offset) == digests
    assert stale.stat().st_size == offset + nbytes
    assert stale.stat().st_blocks * 512 < (1 << 20)
    with open(stale, "rb") as f:
        f.seek(offset)
        assert f.read(nbytes) == bytes(nbytes)


def test_resume_over_stale_partial_bytes_gives_zero_tensors_and_identical_output(tiny_llama, zero_tensors,
                                                                               tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert cli("shard-convert", "--source", tiny_llama, "--output", clean, "-q").exit_code == 0
    out = tmp_path / "out"

    def failing_seal(partial_path, _ready=None):
        raise OSError(errno.EIO, "Input/output error", partial_path)

    with monkeypatch.context() as patch:  # the run fails once every tensor is written, before any seal
        patch.setattr(tasks, "seal_shard", failing_seal)
        failed = cli("shard-convert", "--source", tiny_llama, "--output", out, "-q")
    assert failed.exit_code == 4, failed.output
    state = out / ".mmrec-convert"
    partials = list(state.glob("*.partial"))
    assert partials and not (state / "journal.jsonl").exists()
    for partial in partials:  # stale garbage everywhere, and longer than the shard
        partial.write_bytes(b"\xff" * (partial.stat().st_size + 4096))
    resumed = cli("shard-convert", "--source", tiny_llama, "--output", out, "-q", "--resume")
    assert resumed.exit_code == 0, resumed.output
    files = {p.name for p in out.iterdir()}
    assert files == {p.name for p in clean.iterdir()}
    for name in files - {REPORT}:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    report = json.loads((out / REPORT).read_text())
    clean_report = json.loads((clean / REPORT).read_text())
    assert {n: t["checksum"] for n, t in report["tensors"].items()} == \
        {n: t["checksum"] for n, t in clean_report["tensors"].items()}
    for shard in out.glob("*.safetensors"):
        header = read_header(shard)
        with open(shard, "rb") as f:
            for name in zero_tensors.keys() & header.tensors.keys():
                span = header.tensors[name]
                f.seek(span.start)
                assert f.read(span.nbytes) == bytes(span.nbytes), name
    assert cli("verify", out).exit_code == 0
