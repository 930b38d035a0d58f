"""Hostile inputs, class 1 (RELIABILITY.md): time and memory are bounded by the input's real size, before
anything is allocated or awaited. Each case runs the real CLI in a subprocess under a timeout (a regression
fails instead of hanging) and, where the payload would grow memory, under RLIMIT_AS (a regression dies
instead of eating the machine). Durations are never asserted; the timeout is only the guard."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmrec.safetensors_format import MAX_TENSORS_PER_FILE
from mmrec.streaming.plan.mapping import MAX_MAPPING_NODES
from mmrec.streaming.plan.target import MAX_PLANNED_BYTES
from mmrec.streaming.sources.torch_zip import MAX_PICKLE_BYTES

MEMORY_LIMIT = 3 << 30  # address space of the child: the CLI with torch imported fits; a bomb does not
TIMEOUT = 120


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(*args, memory: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "mmrec", *map(str, args)], capture_output=True, text=True,
                              timeout=TIMEOUT, preexec_fn=_limit_memory if memory else None,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mmrec {' '.join(map(str, args))} did not finish in {TIMEOUT} s (unbounded time)")


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "internal error" not in lines[0]
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


# -- (a) only regular files are read ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "pytorch_model.bin", "model.safetensors.index.json"])
def test_a_fifo_named_like_a_checkpoint_is_refused_not_opened(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    line = one_error_line(run_cli("inspect", fifo), 1)
    assert line == f"error: {fifo}: is a FIFO, not a regular file; only regular files are read"
    line = one_error_line(run_cli("shard-convert", "--source", fifo, "--output", tmp_path / "out"), 1)
    assert str(fifo) in line and "not a regular file" in line
    assert not (tmp_path / "out").exists()


def test_a_fifo_config_or_mapping_file_is_refused(tmp_path, family_checkpoints):
    src = tmp_path / "src"
    src.mkdir()
    for f in Path(family_checkpoints["llama"]).iterdir():
        if f.name != "config.json":
            shutil.copy(f, src / f.name)
    os.mkfifo(src / "config.json")
    line = one_error_line(run_cli("inspect", src), 1)
    assert f"{src}/config.json" in line and "not a regular file" in line
    os.mkfifo(tmp_path / "map.yaml")
    line = one_error_line(run_cli("plan", family_checkpoints["llama"], "--mapping-file", tmp_path / "map.yaml"), 1)
    assert line == f"error: --mapping-file {tmp_path}/map.yaml: is not a regular file; only regular files are read"


def test_a_device_is_refused(tmp_path):
    link = tmp_path / "model.safetensors"
    link.symlink_to("/dev/zero")  # endless: reading it would never end
    line = one_error_line(run_cli("inspect", link), 1)
    assert line == f"error: {link}: is a device, not a regular file; only regular files are read"


# -- (b) a zip entry is checked against a limit and the archive's size before it is decompressed ------------
def _zip(path: Path, pkl: bytes, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
    return path


def test_zip_bomb_data_pkl_is_refused_before_decompressing(tmp_path):
    bomb = _zip(tmp_path / "model.pt", b"\x80\x02" + b"\0" * (MAX_PICKLE_BYTES + 1024))
    assert bomb.stat().st_size < 2 << 20  # a small file...
    line = one_error_line(run_cli("inspect", bomb), 1)  # ...that must not inflate: RLIMIT_AS is the guard
    assert line.startswith(f"error: {bomb}: zip entry 'archive/data.pkl' says it holds {MAX_PICKLE_BYTES + 1026} "
                           "bytes")
    assert f"more than the {MAX_PICKLE_BYTES}-byte limit for it" in line and "refusing to decompress it" in line


def test_zip_entry_lying_about_its_size_is_refused(tmp_path):
    """An entry whose stated size is small but whose stream is longer: read with a bounded reader."""
    path = _zip(tmp_path / "model.pt", b"\x80\x02" + b"\0" * (8 << 20))
    data = bytearray(path.read_bytes())
    real = (8 << 20) + 2
    lie = struct.pack("<I", 100)
    for at in range(len(data) - 4):  # the stated size, in the local header and the central directory
        if data[at:at + 4] == struct.pack("<I", real):
            data[at:at + 4] = lie
    path.write_bytes(bytes(data))
    line = one_error_line(run_cli("inspect", path), 1)
    assert str(path) in line and ("damaged" in line or "cannot read data.pkl" in line), line


def test_stated_size_beyond_what_the_archive_can_hold(tmp_path):
    path = _zip(tmp_path / "model.pt", b"\x80\x02N.", method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    for at in range(len(data) - 4):
        if data[at:at + 4] == struct.pack("<I", 4) and data[at - 4:at] == struct.pack("<I", 4):
            data[at:at + 4] = struct.pack("<I", 4000)  # uncompressed size 4000 in a file of ~300 bytes
    path.write_bytes(bytes(data))
    line = one_error_line(run_cli("inspect", path), 1)
    assert "says it holds 4000 bytes" in line and "than an archive of" in line, line


# -- (c) YAML aliases are measured expanded before anything is built or printed -----------------------------
def test_yaml_billion_laughs_is_refused(tmp_path, family_checkpoints):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "map.yaml").write_text("\n".join(lines) + "\n")  # 9^9 = 387 420 489 strings expanded
    line = one_error_line(run_cli("plan", family_checkpoints["llama"], "--mapping-file", tmp_path / "map.yaml"), 1)
    assert line == (f"error: --mapping-file {tmp_path}/map.yaml: YAML with its aliases expanded holds more than "
                    f"{MAX_MAPPING_NODES} nodes (nested aliases?); a mapping file is a small table")


def test_yaml_small_aliases_still_work(tmp_path, family_checkpoints):
    (tmp_path / "map.yaml").write_text("- &e {target: norm.weight, source: norm.weight}\n- *e\n")
    result = run_cli("plan", family_checkpoints["llama"], "--mapping-file", tmp_path / "map.yaml")
    assert result.returncode == 0, result.stderr


def test_yaml_recursive_alias_is_refused(tmp_path, family_checkpoints):
    (tmp_path / "map.yaml").write_text("a: &a [1, *a]\n")
    line = one_error_line(run_cli("plan", family_checkpoints["llama"], "--mapping-file", tmp_path / "map.yaml"), 1)
    assert "a YAML alias refers to a node that contains it" in line


# -- (d) absurd target sizes are refused up front (exit 2, naming the option) -------------------------------
def test_absurd_vocab_size_is_refused_before_reading(tmp_path, family_checkpoints):
    result = run_cli("shard-convert", "--source", family_checkpoints["llama"], "--output", tmp_path / "out",
                     "--vocab-size", "100000000000000000000")
    line = one_error_line(result, 2)
    assert line.startswith("error: --vocab_size 100000000000000000000 is over the 4294967296 limit")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["shard-convert", "plan"])
def test_planned_output_over_the_limit_is_refused(tmp_path, family_checkpoints, command):
    args = ["--vocab-size", "4000000000", "--model-dim", "4000000000"]
    if command == "plan":
        result = run_cli("plan", family_checkpoints["llama"], *args)
    else:
        result = run_cli("shard-convert", "--source", family_checkpoints["llama"], "--output", tmp_path / "out", *args)
    line = one_error_line(result, 2)
    assert f"over the {MAX_PLANNED_BYTES}-byte (1 PiB) limit for a planned output" in line
    assert "--vocab_size 4000000000" in line and "--model_dim 4000000000" in line
    assert not (tmp_path / "out").exists()


# -- (e) a header of a million zero-size tensors --------------------------------------------------------------
def test_a_million_empty_tensors_are_refused_by_count(tmp_path):
    n = 1_000_000
    body = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    raw = body.encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    line = one_error_line(run_cli("inspect", path), 1)
    assert line == f"error: {path}: header lists {n} tensors, over the {MAX_TENSORS_PER_FILE}-tensor limit for one file"


def test_many_empty_tensors_under_the_limit_still_read(tmp_path):
    from mmrec.safetensors_format import read_header

    n = 20_000
    body = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    assert len(read_header(path).tensors) == n


class _ForgedTensor:
    """Pickles as torch's own tensor rebuild call, with a size/stride/offset torch would never write."""

    def __init__(self, size, stride, offset=0):
        import torch

        base = torch.arange(16, dtype=torch.float32)
        self.storage = torch.storage.TypedStorage(wrap_storage=base.untyped_storage(), dtype=base.dtype,
                                                  _internal=True)
        self.args = (offset, size, stride)

    def __reduce__(self):
        import collections

        import torch

        offset, size, stride = self.args
        return torch._utils._rebuild_tensor_v2, (self.storage, offset, size, stride, False,
                                                 collections.OrderedDict())


@pytest.mark.parametrize("size,stride,offset", [((-1, 4), (4, 1), 0), ((4, 4), (-4, 1), 0), ((2, 4), (4, 1), -3)])
def test_a_torch_tensor_with_a_negative_size_stride_or_offset_is_refused(tmp_path, size, stride, offset):
    import torch

    path = tmp_path / "forged.pt"
    torch.save({"w": _ForgedTensor(size, stride, offset)}, path)
    result = subprocess.run([sys.executable, "-m", "mmrec.cli.app", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "forged.pt" in lines[0] and "negative" in lines[0], result.stderr
