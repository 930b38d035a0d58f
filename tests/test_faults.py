"""Faults during a conversion: SIGKILL at many points then --resume, the disk filling up or a write
failing, a dask worker dying, a second run on the same output. After each, the bytes are identical to a
clean run's. (RELIABILITY.md is the table of these faults.)

Kill points are chosen deterministically: the conversion runs in a subprocess whose `os.<call>` is wrapped
so that its n-th call SIGKILLs the process (or pauses it) just before doing the call, for seeded-random n
over the calls a clean run makes (fstat: the start of each tensor copy, pwrite: headers, copied and computed rows,
fsync: run.json, seals, journal lines, commit; replace: the commit's renames).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmrec.cli.app import app
from mmrec.streaming.synthetic import write_synthetic_llama

MMREC = [sys.executable, "-m", "mmrec"]
OPTIONS = ["--max-shard-size", "4MB", "-q"]
REPORT = "conversion_report.json"

# Runs the CLI with os.<name> wrapped: the n-th call made by mmrec's own code SIGKILLs the process, or with a
# marker path instead of "kill", creates the marker and blocks that thread forever (the test then acts and
# kills it). Calls from libraries (torch's import in a background thread opens files too) are not counted,
# so the n-th call is the same one in every run.
HOOKED_CLI = textwrap.dedent("""
    import os, signal, sys, threading
    import mmrec
    name, n, action = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real, lock, count = getattr(os, name), threading.Lock(), [0]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(mmrec.__file__)))

    def hooked(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if not caller.startswith(repo) or "site-packages" in caller:
            return real(*args, **kwargs)  # only mmrec's own calls count (not a library's, e.g. torch's import)
        with lock:
            count[0] += 1
            hit = count[0] == n
        if hit and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit:
            open(action, "w").close()
            threading.Event().wait()
        return real(*args, **kwargs)

    setattr(os, name, hooked)
    sys.argv = ["mmrec", *sys.argv[4:]]
    from mmrec.cli.app import main
    main()
""")


def output_bytes(directory: Path) -> dict[str, bytes]:
    """Every file a conversion leaves, except the report (it holds timings)."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(directory.iterdir())
            if p.name != REPORT}


def assert_incomplete(out: Path, clean: dict[str, bytes] | None = None) -> None:
    """Nothing that looks complete: no report. A kill during the commit leaves some final names (shards
    renamed, index, config), each already holding its final, fsynced bytes; a kill after the report was
    written (the last fsync, dropping the state directory) leaves a complete output."""
    if not out.exists():
        return
    final = {n: b for n, b in output_bytes(out).items() if not n.startswith(".") and not n.endswith(".tmp")}
    if clean is None:
        assert REPORT not in {p.name for p in out.iterdir()} and not final, sorted(final)
        return
    assert {n: clean.get(n) for n in final} == final  # whatever has a final name has its final bytes
    if (out / REPORT).exists():
        assert final == clean
    elif final:
        assert (out / ".mmrec-convert").is_dir()  # a commit in progress: --resume finishes it


def cli(*args) -> "CliRunner.Result":
    return CliRunner().invoke(app, [*map(str, args)])


def resume(source: Path, out: Path) -> dict:
    result = cli("shard-convert", "--source", source, "--output", out, *OPTIONS, "--resume", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def hooked(source: Path, out: Path, call: str, n: int, action: str = "kill", *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-c", HOOKED_CLI, call, str(n), action, "shard-convert", "--source", str(source),
            "--output", str(out), *OPTIONS, *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    """~33 MB bf16 llama in 2 shards; its conversion writes 14 shards of <= 4 MB."""
    return write_synthetic_llama(tmp_path_factory.mktemp("faults") / "llama", "small", "BF16", "20MB")


@pytest.fixture(scope="module")
def clean(small_llama, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("faults-clean") / "out"
    result = cli("shard-convert", "--source", small_llama, "--output", out, *OPTIONS)
    assert result.exit_code == 0, result.output
    reference = output_bytes(out)
    assert len([n for n in reference if n.endswith(".safetensors")]) == 14
    return reference


# -- SIGKILL at random points, then --resume ----------------------------------------------------------------
_rng = random.Random(20240607)
# Calls a clean run makes (measured): fstat 31 (one per copy task), pwrite 77, fsync 33, replace 18.
KILL_POINTS = [("fstat", _rng.randint(1, 31)), ("pwrite", _rng.randint(1, 77)),
               ("fsync", _rng.randint(2, 33)), ("replace", _rng.randint(3, 18))]


@pytest.mark.parametrize("call, n", KILL_POINTS, ids=[f"{c}-{n}" for c, n in KILL_POINTS])
def test_sigkill_then_resume_gives_identical_bytes(small_llama, clean, tmp_path, call, n):
    out = tmp_path / "out"
    process = hooked(small_llama, out, call, n)
    assert process.wait(timeout=120) == -signal.SIGKILL, process.stderr.read()
    assert_incomplete(out, clean)
    report = resume(small_llama, out)
    assert output_bytes(out) == clean
    assert not (out / ".mmrec-convert").exists()
    assert report["timings"]["resumed_shards"] <= 14


def test_killed_twice_including_during_resume(small_llama, clean, tmp_path):
    out = tmp_path / "out"
    first = hooked(small_llama, out, "fsync", 12)  # some shards journaled
    assert first.wait(timeout=120) == -signal.SIGKILL
    assert_incomplete(out, clean)
    second = hooked(small_llama, out, "pwrite", 3, "kill", "--resume")
    assert second.wait(timeout=120) == -signal.SIGKILL, second.stderr.read()
    assert_incomplete(out, clean)
    assert resume(small_llama, out)["timings"]["resumed_shards"] >= 1
    assert output_bytes(out) == clean


def test_a_second_run_on_a_busy_output_is_refused(small_llama, clean, tmp_path):
    """While a real run holds the output, neither --resume nor --overwrite may touch it."""
    out, paused = tmp_path / "out", tmp_path / "paused"
    process = hooked(small_llama, out, "fstat", 10, str(paused), "--threads", "1")  # all stops
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.02)
        partials = {p.name: p.stat().st_mtime_ns for p in (out / ".mmrec-convert").iterdir()}
        for flag in ("--resume", "--overwrite"):
            busy = cli("shard-convert", "--source", small_llama, "--output", out, *OPTIONS, flag)
            assert busy.exit_code == 3, busy.output
            assert busy.stderr.strip() == (f"error: another conversion is writing to {out}; refusing to run two "
                                           "at once")
        plain = cli("shard-convert", "--source", small_llama, "--output", out, *OPTIONS)
        assert plain.exit_code == 3, plain.output  # the lock's message, not "exists ... --resume"
        assert plain.stderr.strip() == f"error: another conversion is writing to {out}; refusing to run two at once"
        assert {p.name: p.stat().st_mtime_ns for p in (out / ".mmrec-convert").iterdir()} == partials
    finally:
        process.kill()
        process.wait()
    resume(small_llama, out)
    assert output_bytes(out) == clean


def test_ctrl_c_exits_130_with_one_line_then_resumes(small_llama, clean, tmp_path):
    out = tmp_path / "out"
    journal = out / ".mmrec-convert" / "journal.jsonl"
    process = subprocess.Popen([*MMREC, "shard-convert", "--source", str(small_llama), "--output", str(out),
                                *OPTIONS, "--threads", "1", "--memory-budget", "1MB"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert process.stderr.read().strip() == "error: interrupted; rerun with --resume to continue"
    assert_incomplete(out)
    assert resume(small_llama, out)["timings"]["resumed_shards"] >= 1
    assert output_bytes(out) == clean


# -- the disk filling up, a write failing -------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_write_failure_file_too_large_exits_4_and_resumes(small_llama, clean, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([*MMREC, "shard-convert", "--source", str(small_llama), "--output", str(out),
                             *OPTIONS], capture_output=True, text=True, preexec_fn=_file_size_limit(3_500_000))
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {out}/.mmrec-convert/model-") and ".safetensors.partial: " in lines[0]
    assert lines[0].endswith("File too large; fix the cause and rerun with --resume to continue")
    assert_incomplete(out)
    resume(small_llama, out)
    assert output_bytes(out) == clean


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs (the output needs ~45 MB): a real ENOSPC in the middle of the run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_exits_4_then_resume_after_freeing_space(small_llama, clean, small_disk):
    out = small_disk / "out"
    full = cli("shard-convert", "--source", small_llama, "--output", out, *OPTIONS)
    assert full.exit_code == 4 and isinstance(full.exception, SystemExit), (full.output, full.exception)
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}/"), full.stderr
    assert "No space left on device; fix the cause and rerun with --resume" in lines[0]
    assert_incomplete(out)
    journal = out / ".mmrec-convert" / "journal.jsonl"
    kept = journal.read_text().count("\n") if journal.exists() else 0
    assert 1 <= kept < 14  # it failed mid-run, after some shards were complete
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    report = resume(small_llama, out)
    assert report["timings"]["resumed_shards"] == kept
    assert output_bytes(out) == clean


# -- a dask worker dying --------------------------------------------------------------------------------------
def test_local_cluster_worker_killed_mid_run_still_gives_identical_bytes(small_llama, clean, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    journal = out / ".mmrec-convert" / "journal.jsonl"
    process = subprocess.Popen([*MMREC, "shard-convert", "--source", str(small_llama), "--output", str(out),
                                "--max-shard-size", "4MB", "--workers", "2", "--memory-budget", "1MB", "-q"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    with contextlib.suppress(psutil.NoSuchProcess):
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 1:  # a shard is complete
                workers = [c for c in psutil.Process(process.pid).children(recursive=True)
                           if "spawn_main" in " ".join(c.cmdline())]
                if workers:
                    killed = workers[0].pid
                    os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.005)
    assert process.wait(timeout=180) == 0, process.stderr.read()
    assert killed is not None, "no worker to kill before the run ended"
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert output_bytes(out) == clean
