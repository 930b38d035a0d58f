"""One clear line per failure, and exit codes a script can act on.

Exit codes: 0 done; 1 bad input (source, plan, mapping, config); 2 bad command-line option (typer);
3 output refused (exists, locked, inside the source, resume with changed inputs); 4 write failure
(disk full, I/O error); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import sys

import typer

EXIT_INPUT, EXIT_USAGE, EXIT_REFUSED, EXIT_WRITE, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def fail(message: str, code: int) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def clean_errors(debug: bool = False):
    """Turn the project's own exceptions into one line on stderr and an exit code (a traceback with --debug)."""
    from mmrec.streaming.output import OutputRefused

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        raise fail("interrupted; rerun with --resume to continue", EXIT_INTERRUPTED) from None
    except OutputRefused as exc:
        if debug:
            raise
        raise fail(str(exc), EXIT_REFUSED) from None
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise fail(f"{where}{exc.strerror or exc}", EXIT_WRITE) from None
    except ValueError as exc:  # SourceError, PlanError, ConfigError, CheckpointError, ...
        if debug:
            raise
        raise fail(str(exc).strip("'\""), EXIT_INPUT) from None
