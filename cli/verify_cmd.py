"""`mmrec verify`: check a converted checkpoint against its index, headers and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import EXIT_INPUT, clean_errors
from .plan_options import FLAG


def verify(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="Converted checkpoint directory or .safetensors file."),
    source: Optional[str] = typer.Option(None, "--source", metavar="PATH|URL",
                                         help="Also recompute transferred tensors from this source (a path, or a "
                                              "URL: docs/remote.md)."),
    json_output: bool = typer.Option(False, "--json", metavar=FLAG, help="Print the result as JSON."),
    debug: bool = typer.Option(False, "--debug", metavar=FLAG, help="Show tracebacks."),
) -> None:
    """Verify index <-> headers <-> file sizes and every tensor's checksum (exit 1 on any problem)."""
    with clean_errors(debug):
        from mmrec.streaming.verify import verify as run_verify

        from mmrec.streaming.sources.paths import source_argument

        result = run_verify(output, source_argument(source) if source is not None else None)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from mmrec.streaming.terminal import escape

        for problem in result.problems:
            typer.echo(f"problem: {escape(problem)}", err=True)
        status = "OK" if result.ok else f"FAILED ({_count(len(result.problems), 'problem')})"
        typer.echo(f"{status}: {_count(result.files, 'file')}, {_count(result.tensors, 'tensor')}, "
                   f"{_count(result.checksums_checked, 'checksum')} checked"
                   + (f", {result.recomputed} recomputed from the source" if source else ""))
    if not result.ok:
        raise typer.Exit(EXIT_INPUT)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
