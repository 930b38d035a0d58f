"""Ctrl-C for the `mmrec` command: one line on stderr and exit 130, however many SIGINTs arrive and wherever.

Python's own handling raises KeyboardInterrupt at every SIGINT, and the interpreter's shutdown then joins
dask's pool threads and runs torch's finalizers while native threads (a background `import torch`, torch's
C++ pools) still run. A second Ctrl-C lands in that clean-up and prints a threading traceback, or the
shutdown ends in `terminate called without an active exception` (SIGABRT) or a segfault. So:

* before the command runs (interpreter start, imports) nothing has been written: a SIGINT there prints the
  line and exits at once;
* while it runs, the first SIGINT raises KeyboardInterrupt (the command's clean-up runs: the journal keeps
  the shards proven complete, the output's lock is released) and every later SIGINT is ignored; one that
  lands inside importlib's locking (which would swallow it and deadlock) is raised once imports settle, and
  a clean-up still stuck after WATCHDOG_SECONDS is ended anyway;
* the process then ends with os._exit(130) once stderr is flushed: no interpreter shutdown races the live
  native threads. The kernel releases the lock's flock with the process in any case.
"""

from __future__ import annotations

import _imp
import _thread
import os
import signal
import sys
import threading
import time

PREFIX = "error: interrupted"
RESUMABLE_COMMANDS = ("shard-convert", "distill", "finetune")  # the commands with a --resume


def message() -> str:
    """The one line: a hint to --resume only for a command that has one (`mmrec verify` has nothing to resume)."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return PREFIX + ("; rerun with --resume to continue" if command in RESUMABLE_COMMANDS else "")


EXIT_INTERRUPTED = 130

_interrupted = threading.Event()  # a SIGINT came
_raised = threading.Event()  # its KeyboardInterrupt was raised in the main thread
_running = False  # the command has started: raise KeyboardInterrupt instead of exiting at once


class _Stderr:
    """sys.stderr, noting whether the interrupt's line was already written (by cli/errors.py)."""

    def __init__(self, stream):
        self._stream = stream
        self.wrote_message = False

    def write(self, text):
        if PREFIX in text:
            self.wrote_message = True
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass


def exit_interrupted() -> None:
    """Print the line unless it was printed, flush, and end the process now (no interpreter shutdown)."""
    ignore_from_now()
    stderr = sys.stderr
    if not getattr(stderr, "wrote_message", False):
        try:
            _flush()
            stderr.write(message() + "\n")
        except Exception:
            pass
    _flush()
    os._exit(EXIT_INTERRUPTED)


WATCHDOG_SECONDS = 30.0  # a clean-up still stuck this long after the Ctrl-C (a deadlock) is ended anyway


def _watchdog() -> None:
    time.sleep(WATCHDOG_SECONDS)
    exit_interrupted()


def _interrupt_when_imports_settle() -> None:
    while _imp.lock_held():
        time.sleep(0.001)
    _thread.interrupt_main()  # our handler again, now outside the import machinery


def _handler(signum, frame) -> None:
    if not _running:
        _interrupted.set()
        exit_interrupted()
    if _raised.is_set():
        return  # later Ctrl-Cs: the clean-up of the first one runs undisturbed
    if _imp.lock_held():
        # raised inside importlib's module-lock callback, KeyboardInterrupt would be swallowed there with
        # the import lock still held: every later import deadlocks. Raise it once imports settle.
        if not _interrupted.is_set():
            _interrupted.set()
            threading.Thread(target=_interrupt_when_imports_settle, daemon=True).start()
        return
    _interrupted.set()
    _raised.set()
    threading.Thread(target=_watchdog, daemon=True).start()
    raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT (main thread only); until start() a SIGINT exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    if not isinstance(sys.stderr, _Stderr) and sys.stderr is not None:
        sys.stderr = _Stderr(sys.stderr)
    signal.signal(signal.SIGINT, _handler)


def start() -> None:
    """The command starts: from now on the first SIGINT raises KeyboardInterrupt, later ones are ignored."""
    global _running
    _running = True


def ignore_from_now() -> None:
    """The command is over: ignore SIGINT (SIG_IGN, which the interpreter's shutdown keeps; a Python handler
    it would reset to the default, and a Ctrl-C then would kill the process by signal)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted() -> bool:
    return _interrupted.is_set()


def launched_as_command() -> bool:
    """Whether this process is the `mmrec` command (its console script or `python -m mmrec`), not a
    program or test that merely imports the CLI."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return argv0 == "mmrec" or (argv0 == "__main__.py" and os.path.basename(os.path.dirname(sys.argv[0])) == "mmrec")
