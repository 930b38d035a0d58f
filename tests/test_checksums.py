"""Checksums of converted tensors (streaming/checksums.py): pieces of whole rows hashed while written, combined
per tensor; `mmrec verify` checks them (and the older whole-tensor "xxh3_128" ones); the run identity carries
the format; `import mmrec.streaming.convert` and a dry run do not load torch."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmrec.cli.app import app
from mmrec.safetensors_format import read_header
from mmrec.streaming import checksums, convert as convert_module, graph, tasks
from mmrec.streaming.checksums import PieceHasher, combine, file_checksum, piece_rows
from mmrec.streaming.plan.model import TensorPlan
from mmrec.streaming.synthetic import write_synthetic_llama

REPORT = "conversion_report.json"
NEW_ALGORITHM = "xxh3_128/16MiB-row-pieces"
# --vocab-size 20000: embedding and head become 20000 x 512 bf16 (20.5 MB), two checksum pieces each
CONVERT_ARGS = ["--vocab-size", "20000", "--max-shard-size", "8MB", "-q"]


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def reference_pieces(data: bytes, piece_bytes: int) -> list[bytes]:
    """The definition written out: xxh3-128 digests of consecutive pieces (an empty input is one piece)."""
    if not data:
        return [xxhash.xxh3_128(b"").digest()]
    return [xxhash.xxh3_128(data[i:i + piece_bytes]).digest() for i in range(0, len(data), piece_bytes)]


def reference_checksum(data: bytes, row_bytes: int, piece_limit: int = 16 << 20) -> str:
    rows_per_piece = max(1, piece_limit // row_bytes) if row_bytes else 1
    return xxhash.xxh3_128(b"".join(reference_pieces(data, rows_per_piece * max(row_bytes, 1)))).hexdigest()


def tensor_spans(out: Path) -> dict:
    """{tensor name: (file, span)} of every shard of an output directory."""
    spans = {}
    for file in sorted(out.glob("*.safetensors")):
        for name, span in read_header(file).tensors.items():
            spans[name] = (file, span)
    return spans


def tensor_bytes(out: Path) -> dict[str, bytes]:
    result = {}
    for name, (file, span) in tensor_spans(out).items():
        with open(file, "rb") as f:
            f.seek(span.start)
            result[name] = f.read(span.nbytes)
    return result


def row_bytes_of(span) -> int:
    rows = span.shape[0] if span.shape else 1
    return span.nbytes // rows if rows else 0


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("cs-src") / "llama", "small", "BF16", "20MB")


@pytest.fixture(scope="module")
def converted(small_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cs-out") / "out"
    result = cli("shard-convert", "--source", small_llama, "--output", out, *CONVERT_ARGS, "--threads", "3")
    assert result.exit_code == 0, result.output
    return out


def copy_output(converted: Path, to: Path) -> Path:
    shutil.copytree(converted, to)
    return to


# -- PieceHasher, combine, task ranges ---------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=3000), piece_bytes=st.integers(1, 700),
       cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_piece_digests_do_not_depend_on_the_blocks_fed(data, piece_bytes, cuts):
    hasher = PieceHasher(piece_bytes)
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        hasher.update(data[a:b])  # empty blocks included
    assert hasher.finish() == reference_pieces(data, piece_bytes)


@settings(max_examples=150, deadline=None)
@given(piece_bytes=st.integers(1, 500),
       ops=st.lists(st.one_of(st.binary(max_size=400), st.integers(0, 1500)), max_size=10))
def test_update_zeros_is_update_of_zero_bytes(piece_bytes, ops):
    zeros_hasher, bytes_hasher, data = PieceHasher(piece_bytes), PieceHasher(piece_bytes), b""
    for op in ops:
        if isinstance(op, int):
            zeros_hasher.update_zeros(op)
            bytes_hasher.update(bytes(op))
            data += bytes(op)
        else:
            zeros_hasher.update(op)
            bytes_hasher.update(op)
            data += op
    assert zeros_hasher.finish() == bytes_hasher.finish() == reference_pieces(data, piece_bytes)


@pytest.mark.parametrize("prefix", [b"", b"x" * 1000])
def test_update_zeros_at_the_real_piece_size(prefix):
    """Whole zero pieces take a cached digest; it must be the digest of those zeros."""
    size = checksums.PIECE_BYTES
    zeros_hasher, bytes_hasher = PieceHasher(size), PieceHasher(size)
    zeros_hasher.update(prefix)
    bytes_hasher.update(prefix)
    zeros_hasher.update_zeros(2 * size + 5)
    bytes_hasher.update(bytes(2 * size + 5))
    zeros_hasher.update_zeros(size)  # a cached whole piece again, or (with a prefix) a split one
    bytes_hasher.update(bytes(size))
    assert zeros_hasher.finish() == bytes_hasher.finish()


def test_piece_rows_are_whole_rows_within_16_mib():
    assert checksums.ALGORITHM == NEW_ALGORITHM and checksums.PIECE_BYTES == 16 << 20
    for row_bytes in (1, 2, 3, 1000, 1024, 11008 * 2, (16 << 20) - 1, 16 << 20, (16 << 20) + 1, 100 << 20):
        rows = piece_rows(row_bytes)
        assert rows >= 1 and (rows == 1 or rows * row_bytes <= 16 << 20)
        assert rows == max(1, (16 << 20) // row_bytes)
    assert piece_rows(0) >= 1


@pytest.mark.parametrize("rows, row_bytes, task_bytes", [
    (0, 1024, 1 << 20), (1, 3, 1), (100_000, 1024, 128 << 20), (100_000, 1024, 20 << 20),
    (100_000, 1024, 1), (40_000, 4097, 16 << 20), (7, 40 << 20, 128 << 20), (17, 5, 3),
])
def test_task_row_ranges_cover_the_tensor_on_piece_boundaries(rows, row_bytes, task_bytes):
    ranges = graph.task_row_ranges(rows, row_bytes, task_bytes)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(ranges, ranges[1:]))  # contiguous
    assert all(a % piece_rows(row_bytes) == 0 for a, _ in ranges)
    assert all(b > a for a, b in ranges) or ranges == [(0, 0)]


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 4 KiB and copy blocks of 1000 bytes, so small tensors span many of both."""
    monkeypatch.setattr(checksums, "PIECE_BYTES", 4096)
    monkeypatch.setattr(tasks, "COPY_BLOCK", 1000)
    return 4096


def _write_tasks(partial: Path, tensor: dict, offset: int, row_bytes: int, rows: int, task_bytes: int,
                 copy_from=None, reverse=False, chunk_bytes=1 << 20) -> str:
    ranges = graph.task_row_ranges(rows, row_bytes, task_bytes)
    results = {}
    for a, b in (reversed(ranges) if reverse else ranges):  # tasks may run in any order
        task = tasks.WriteTask(str(partial), tensor, offset, row_bytes, a, b, "", "", 0, chunk_bytes, copy_from)
        results[a] = tasks.write_rows(task)
    return tasks.combine_checksums([results[a] for a, _ in ranges])


@pytest.mark.parametrize("task_bytes", [1, 5000, 40_000, 128 << 20])
def test_copy_tasks_of_any_split_combine_to_the_single_pass(small_pieces, tmp_path, task_bytes):
    rows, row_bytes, src_start, offset = 1000, 34, 1000, 77  # odd sizes: nothing page- or piece-aligned
    data = random.Random(task_bytes).randbytes(rows * row_bytes)
    source = tmp_path / "source.bin"
    source.write_bytes(b"s" * src_start + data + b"tail")
    partial = tmp_path / "out.partial"
    tasks.prepare_shard(str(partial), b"h" * offset, offset + len(data) + 10)
    tensor = TensorPlan("embedding.weight", "BF16", (rows, row_bytes // 2), "copy", ["x"], []).to_dict()
    checksum = _write_tasks(partial, tensor, offset, row_bytes, rows, task_bytes,
                            (str(source), src_start, src_start + len(data)), reverse=task_bytes == 5000)
    written = partial.read_bytes()
    assert written == b"h" * offset + data + bytes(10)
    expected = reference_checksum(data, row_bytes, piece_limit=small_pieces)
    assert checksum == expected
    assert file_checksum(str(partial), offset, offset + len(data), row_bytes) == expected


@pytest.mark.parametrize("task_bytes", [1, 9000, 128 << 20])
def test_init_tasks_of_any_split_combine_to_the_single_pass(small_pieces, tmp_path, task_bytes):
    import torch

    from mmrec import conversion_init

    shape, offset = (333, 77), 5  # rows of 154 bytes: a piece is 26 rows, blocks of chunk_bytes cut elsewhere
    tensor = TensorPlan("blocks.0.W_q.weight", "BF16", shape, "init", [], [], "xavier_uniform").to_dict()
    row_bytes = 77 * 2
    nbytes = shape[0] * row_bytes
    partial = tmp_path / "out.partial"
    partial.write_bytes(b"\xff" * (offset + nbytes))  # stale bytes of an older partial file
    tasks.prepare_shard(str(partial), b"h" * offset, offset + nbytes)
    checksum = _write_tasks(partial, tensor, offset, row_bytes, shape[0], task_bytes, chunk_bytes=1000)
    expected_bytes = conversion_init("blocks.0.W_q.weight", shape, seed=0, dtype=torch.bfloat16) \
        .view(torch.uint8).numpy().tobytes()
    assert partial.read_bytes() == b"h" * offset + expected_bytes
    assert checksum == reference_checksum(expected_bytes, row_bytes, piece_limit=small_pieces)
    assert checksum == file_checksum(str(partial), offset, offset + nbytes, row_bytes)


def test_empty_tensor_has_the_checksum_of_one_empty_piece(tmp_path):
    partial = tmp_path / "out.partial"
    tasks.prepare_shard(str(partial), b"h" * 8, 8)
    tensor = TensorPlan("blocks.0.W_q.weight", "BF16", (0, 16), "init", [], [], "xavier_uniform").to_dict()
    checksum = _write_tasks(partial, tensor, 8, 32, 0, 128 << 20)
    assert checksum == combine([xxhash.xxh3_128(b"").digest()]) == file_checksum(str(partial), 8, 8, 32)


# -- a real conversion's report -------------------------------------------------------------------------------
def test_report_checksums_are_the_files_checksums(converted):
    report = json.loads((converted / REPORT).read_text())
    assert report["checksum_algorithm"] == NEW_ALGORITHM and report["init_format"] == 2
    spans = tensor_spans(converted)
    assert set(spans) == set(report["tensors"])
    multi_piece = 0
    for name, (file, span) in spans.items():
        with open(file, "rb") as f:
            f.seek(span.start)
            data = f.read(span.nbytes)
        expected = report["tensors"][name]["checksum"]
        assert file_checksum(str(file), span.start, span.end, row_bytes_of(span)) == expected, name
        assert reference_checksum(data, row_bytes_of(span)) == expected, name  # independent of the code
        multi_piece += span.nbytes > 16 << 20
    assert multi_piece >= 2  # embedding and head span two pieces each


def test_identical_bytes_and_checksums_across_threads_budget_and_task_splits(small_llama, converted, tmp_path,
                                                                               monkeypatch):
    reference = tensor_bytes(converted)
    ref_sums = {n: t["checksum"] for n, t in json.loads((converted / REPORT).read_text())["tensors"].items()}
    ref_files = {p.name: p.read_bytes() for p in converted.iterdir() if p.name != REPORT}
    runs = [("one-thread", ["--threads", "1"]), ("tight-budget", ["--threads", "3", "--memory-budget", "8MB"])]
    for label, extra in runs:
        out = tmp_path / label
        result = cli("shard-convert", "--source", small_llama, "--output", out, *CONVERT_ARGS, *extra)
        assert result.exit_code == 0, result.output
        assert tensor_bytes(out) == reference, label
        assert {n: t["checksum"] for n, t in json.loads((out / REPORT).read_text())["tensors"].items()} == \
            ref_sums, label
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != REPORT} == ref_files, label
    # tasks of one piece each (the 20000-row tensors split into two write tasks): the same checksums
    split_graph = functools.partial(graph.build_graph, task_bytes=1)
    monkeypatch.setattr(convert_module, "build_graph", split_graph)
    seen = []
    real_write_rows = tasks.write_rows
    monkeypatch.setattr(tasks, "write_rows", lambda task: seen.append(task) or real_write_rows(task))
    out = tmp_path / "split"
    result = cli("shard-convert", "--source", small_llama, "--output", out, *CONVERT_ARGS, "--threads", "2")
    assert result.exit_code == 0, result.output
    assert sum(t.tensor["name"] == "embedding.weight" for t in seen) == 2
    assert tensor_bytes(out) == reference
    assert {n: t["checksum"] for n, t in json.loads((out / REPORT).read_text())["tensors"].items()} == ref_sums


# -- verify: new, old and unknown algorithms -------------------------------------------------------------------
def _flip_byte(file: Path, position: int) -> None:
    with open(file, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x10]))


def _problems(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("problem: ")]


def test_verify_accepts_old_whole_tensor_checksums(converted, tmp_path):
    out = copy_output(converted, tmp_path / "old")
    report = json.loads((out / REPORT).read_text())
    new_sums = {n: t["checksum"] for n, t in report["tensors"].items()}
    report["checksum_algorithm"] = "xxh3_128"
    for name, data in tensor_bytes(out).items():
        report["tensors"][name]["checksum"] = xxhash.xxh3_128(data).hexdigest()
    assert any(report["tensors"][n]["checksum"] != new_sums[n] for n in new_sums)  # the formats differ
    (out / REPORT).write_text(json.dumps(report))
    result = cli("verify", out)
    assert result.exit_code == 0, result.output
    assert f"{len(new_sums)} checksums checked" in result.stdout
    # a report from before the field existed is the old algorithm too
    del report["checksum_algorithm"]
    (out / REPORT).write_text(json.dumps(report))
    assert cli("verify", out).exit_code == 0
    # the algorithm field decides: old checksums under the new name are wrong
    report["checksum_algorithm"] = NEW_ALGORITHM
    (out / REPORT).write_text(json.dumps(report))
    mismatched = cli("verify", out)
    assert mismatched.exit_code == 1
    multi_piece = {n for n, (_, span) in tensor_spans(out).items() if span.nbytes > 16 << 20}
    assert {p.split("'")[1] for p in _problems(mismatched)} >= multi_piece
    # a flipped byte in a tensor is caught by the old algorithm, naming that tensor only
    report["checksum_algorithm"] = "xxh3_128"
    (out / REPORT).write_text(json.dumps(report))
    file, span = tensor_spans(out)["blocks.1.ffn.0.weight"]
    _flip_byte(file, span.start + span.nbytes // 2 + 1)
    damaged = cli("verify", out)
    assert damaged.exit_code == 1
    assert _problems(damaged) == [f"problem: tensor 'blocks.1.ffn.0.weight' in {file.name}: bytes do not match "
                                  "the report's checksum"]


def test_verify_names_a_tensor_damaged_in_its_second_piece(converted, tmp_path):
    out = copy_output(converted, tmp_path / "damaged")
    assert cli("verify", out).exit_code == 0
    file, span = tensor_spans(out)["embedding.weight"]
    _flip_byte(file, span.start + 19_000 * row_bytes_of(span) + 3)  # row 19000: past the first 16 MiB piece
    result = cli("verify", out)
    assert result.exit_code == 1
    assert _problems(result) == [f"problem: tensor 'embedding.weight' in {file.name}: bytes do not match the "
                                 "report's checksum"]


def test_verify_refuses_an_unknown_checksum_algorithm(converted, tmp_path):
    out = copy_output(converted, tmp_path / "future")
    report = json.loads((out / REPORT).read_text())
    report["checksum_algorithm"] = "blake3/64MiB-row-pieces"
    (out / REPORT).write_text(json.dumps(report))
    result = cli("verify", out)
    assert result.exit_code == 1
    assert any("blake3/64MiB-row-pieces" in p for p in _problems(result)), result.stderr
    assert "FAILED" in result.stdout
    with pytest.raises(ValueError, match="blake3"):
        file_checksum(str(next(out.glob("*.safetensors"))), 0, 8, 8, "blake3/64MiB-row-pieces")


# -- the format in the run identity ------------------------------------------------------------------------
KILL_AT_SECOND_FSYNC = textwrap.dedent("""
    import os, signal, sys
    real, count = os.fsync, [0]

    def hooked(fd):
        count[0] += 1
        if count[0] == 2:  # the first is run.json; the second seals a shard
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd)

    os.fsync = hooked
    sys.argv = ["mmrec", *sys.argv[1:]]
    from mmrec.cli.app import main
    main()
""")


def test_resume_refuses_a_run_of_another_format(tmp_path):
    source = write_synthetic_llama(tmp_path / "tiny", "tiny", "BF16")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_FSYNC, "shard-convert", "--source", str(source),
                             "--output", str(out), "-q"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_json = out / ".mmrec-convert" / "run.json"
    identity = json.loads(run_json.read_text())
    assert identity["format"] == f"checksums {NEW_ALGORITHM}, init 2"
    state = {p.name: p.read_bytes() for p in run_json.parent.iterdir() if p.name not in ("run.json", "lock")}
    assert any(n.endswith(".partial") for n in state)
    run_json.write_text(json.dumps(identity | {"format": "checksums xxh3_128, init 1"}))
    refused = cli("shard-convert", "--source", source, "--output", out, "-q", "--resume")
    assert refused.exit_code == 3, refused.output
    assert "format" in refused.stderr and "--overwrite" in refused.stderr
    assert {p.name: p.read_bytes() for p in run_json.parent.iterdir() if p.name not in ("run.json", "lock")} == state
    assert not (out / REPORT).exists()
    run_json.write_text(json.dumps(identity))  # the same format: the resume goes ahead
    resumed = cli("shard-convert", "--source", source, "--output", out, "-q", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert cli("verify", out).exit_code == 0


# -- torch is not imported where it is not needed ---------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_import_convert_does_not_import_torch():
    done = _python("""
        import sys
        import mmrec.streaming.convert
        print("torch" in sys.modules, "numpy" in sys.modules, "mmrec.streaming.graph" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]  # neither torch nor numpy; the engine is there


def test_dry_run_does_not_import_torch(tmp_path):
    source = write_synthetic_llama(tmp_path / "tiny", "tiny", "BF16")
    done = _python(f"""
        import sys
        sys.argv = ["mmrec", "shard-convert", "--source", {str(source)!r}, "--output", {str(tmp_path / 'out')!r},
                    "--dry-run", "--json"]
        from mmrec.cli.app import main
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        print("torch-imported:", "torch" in sys.modules, "exit:", code, file=sys.stderr)
    """)
    assert done.returncode == 0, done.stderr
    assert "torch-imported: False exit: 0" in done.stderr, done.stderr
    assert json.loads(done.stdout)["tensors"]  # the plan was printed
    assert not (tmp_path / "out").exists()


# -- copies where the source cannot be memory-mapped; torch's thread count ------------------------------------
def test_copies_fall_back_to_reading_when_the_source_cannot_be_mapped(small_llama, converted, tmp_path,
                                                                        monkeypatch):
    """Some network filesystems refuse mmap (ENODEV): copies then read into a buffer; same bytes."""
    import errno
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", refuse)
    out = tmp_path / "read"
    result = cli("shard-convert", "--source", small_llama, "--output", out, *CONVERT_ARGS, "--threads", "3")
    assert result.exit_code == 0, result.output
    assert tensor_bytes(out) == tensor_bytes(converted)


def test_python_api_keeps_the_callers_torch_threads(small_llama, tmp_path):
    """Tasks run torch single-threaded (a product's bytes must not depend on BLAS threads); a caller who
    had set its own count gets it back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        convert_module.convert(convert_module.ConvertOptions(source=small_llama, output=tmp_path / "api",
                                                             quiet=True))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
