"""One clear line per failure, and exit codes a script can act on.

Exit codes: 0 done; 1 bad input (source, plan, mapping, config); 2 bad command-line option (typer, or a
dask scheduler that cannot be reached);
3 output refused (exists, locked, inside the source, resume with changed inputs); 4 write failure
(disk full, I/O error); 130 interrupted. RELIABILITY.md lists every case and its message.
"""

from __future__ import annotations

import contextlib
import errno
import sys

import typer

EXIT_INPUT, EXIT_USAGE, EXIT_REFUSED, EXIT_WRITE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

# Write failures after which the partial output is kept and `--resume` continues once the cause is fixed.
RESUMABLE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


def fail(message: str, code: int) -> typer.Exit:
    from mmrec.streaming.terminal import escape

    # Names from a file (tensors, paths, config strings) may hold escape sequences or newlines: one line,
    # inert, whatever the message carries.
    print(f"error: {escape(message)}", file=sys.stderr)
    return typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


@contextlib.contextmanager
def clean_errors(debug: bool = False, resumable: bool = False):
    """Turn exceptions into one line on stderr and an exit code (a traceback with --debug). `resumable`: the
    command has a --resume, so an interruption's or a write failure's line says to rerun with it."""
    from mmrec.streaming.graph import SchedulerError
    from mmrec.streaming.output import OutputRefused

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        raise fail("interrupted" + ("; rerun with --resume to continue" if resumable else ""),
                   EXIT_INTERRUPTED) from None
    except OutputRefused as exc:
        if debug:
            raise
        raise fail(_one_line(str(exc)), EXIT_REFUSED) from None
    except SchedulerError as exc:  # --scheduler / --scheduler-file names nothing we can reach
        if debug:
            raise
        raise fail(_one_line(str(exc)), EXIT_USAGE) from None
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        hint = ("; fix the cause and rerun with --resume to continue"
                if resumable and exc.errno in RESUMABLE_ERRNOS else "")
        raise fail(_one_line(f"{where}{exc.strerror or exc}{hint}"), EXIT_WRITE) from None
    except (ValueError, RecursionError) as exc:  # SourceError, PlanError, ConfigError, CheckpointError, ...
        if debug:
            raise
        raise fail(_one_line(str(exc)), EXIT_INPUT) from None
    except Exception as exc:  # a bug of ours: still one line, the traceback behind --debug
        if debug:
            raise
        raise fail(f"internal error ({type(exc).__name__}: {_one_line(str(exc))}); rerun with --debug for "
                   "the traceback and please report it", EXIT_INPUT) from None
