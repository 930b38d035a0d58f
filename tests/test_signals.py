"""Two quick Ctrl-Cs (SIGINT 50-200 ms apart) end `mmrec shard-convert` with the one line and exit 130 --
never a threading traceback, `terminate called without an active exception` or a hang -- and `--resume`
then finishes the conversion (RELIABILITY.md, hostile-input class 5)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmrec.streaming.synthetic import write_synthetic_llama

MMREC = [sys.executable, "-m", "mmrec"]
OPTIONS = ["--max-shard-size", "4MB", "-q"]
LINE = "error: interrupted; rerun with --resume to continue"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_synthetic_llama(tmp_path_factory.mktemp("signals") / "llama", "small", "BF16", "20MB")


def _convert(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*MMREC, "shard-convert", "--source", str(source), "--output", str(out), *OPTIONS,
                             "--threads", "2", "--memory-budget", "1MB", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _two_sigints(process: subprocess.Popen, gap: float) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    time.sleep(gap)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("hung after two SIGINTs")
    return code, process.stderr.read()


def _assert_one_line(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    assert (code, stderr) == (130, LINE + "\n")


def _finish_and_verify(source: Path, out: Path) -> None:
    convert = [*MMREC, "shard-convert", "--source", str(source), "--output", str(out), *OPTIONS]
    if (out / ".mmrec-convert" / "run.json").exists():  # an interrupted conversion is there: continue it
        finish = [*convert, "--resume"]
    elif (out / "conversion_report.json").exists():  # the SIGINT came after the last shard was sealed
        finish = None
    else:  # stopped before the output was touched: nothing to resume
        finish = [*convert, "--overwrite"]
    if finish is not None:
        result = subprocess.run(finish, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    verified = subprocess.run([*MMREC, "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("delay, gap", [(0.5, 0.05), (0.7, 0.1), (1.0, 0.2)])
def test_two_sigints_early(source, tmp_path, delay, gap):
    """During the imports and the planning. (Not in the first ~0.1-0.3 s: until `mmrec.cli.app` is imported,
    Python's own SIGINT handling applies.)"""
    out = tmp_path / "out"
    process = _convert(source, out)
    time.sleep(delay)
    _assert_one_line(*_two_sigints(process, gap))
    _finish_and_verify(source, out)


@pytest.mark.parametrize("shards_done, gap", [(1, 0.05), (3, 0.2)])
def test_two_sigints_while_writing_then_resume(source, tmp_path, shards_done, gap):
    """During the dask run (torch imported in a background thread, the pool's threads writing)."""
    out = tmp_path / "out"
    journal = out / ".mmrec-convert" / "journal.jsonl"
    process = _convert(source, out)
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_text().count("\n") >= shards_done):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.005)
    _assert_one_line(*_two_sigints(process, gap))
    assert not (out / "conversion_report.json").exists()
    _finish_and_verify(source, out)


def test_a_command_without_resume_does_not_suggest_it(tmp_path):
    process = subprocess.Popen([*MMREC, "demo", "--output", str(tmp_path / "demo")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    code, stderr = process.wait(timeout=60), process.stderr.read()
    assert "Traceback" not in stderr and code == 130, stderr
    assert stderr.splitlines()[-1] == "error: interrupted"


def test_resume_after_a_stop_between_the_lock_and_the_run_record(source, tmp_path):
    """A Ctrl-C right after the state directory's lock was taken leaves `.mmrec-convert/lock` and nothing else:
    --resume starts the run (there is nothing to keep), and the bytes equal an uninterrupted conversion."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    convert = [*MMREC, "shard-convert", "--source", str(source), *OPTIONS]
    assert subprocess.run([*convert, "--output", str(reference)], timeout=120).returncode == 0
    (out / ".mmrec-convert").mkdir(parents=True)
    (out / ".mmrec-convert" / "lock").touch()
    refused = subprocess.run([*convert, "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3 and "--resume" in refused.stderr, refused.stderr
    resumed = subprocess.run([*convert, "--output", str(out), "--resume"], capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    for path in reference.iterdir():
        if path.suffix == ".safetensors":
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
