"""`mmrec shard-convert`: the product's main command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import EXIT_USAGE, clean_errors, fail
from .plan_options import DEFAULT_INIT_MODE, INIT_HELP, check_plan_options


def shard_convert(
    source: Path = typer.Option(..., "--source", help="Checkpoint file or directory to convert."),
    output: Path = typer.Option(..., "--output", help="Output directory, or a single .safetensors file."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab_size", "--vocab-size", help="Target vocabulary (pad/truncate)."),
    model_dim: Optional[int] = typer.Option(None, "--model_dim", "--model-dim", help="Target hidden size."),
    num_layers: Optional[int] = typer.Option(None, "--num_layers", "--num-layers", help="Target layer count."),
    num_heads: Optional[int] = typer.Option(None, "--num_heads", "--num-heads", help="Target memory-attention heads."),
    ffn_dim: Optional[int] = typer.Option(None, "--ffn_dim", "--ffn-dim", help="Target FFN width."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any target tensor cannot come from the source."),
    no_initialize_new: bool = typer.Option(False, "--no_initialize_new", "--no-initialize-new",
                                           help="Write only converted tensors (a partial checkpoint)."),
    mapping: str = typer.Option("default", "--mapping", help="Mapping table: default or extended."),
    mapping_file: Optional[Path] = typer.Option(None, "--mapping-file", help="JSON/YAML mapping that replaces or extends the table."),
    layer_map: str = typer.Option("first", "--layer-map", help="first, uniform, or a list like 0,2,4."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (bfloat16, float16, float32); default: the source's."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new components' init."),
    init: str = typer.Option(DEFAULT_INIT_MODE, "--init", help=INIT_HELP),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard (decimal units: 5GB = 5e9 bytes)."),
    memory_budget: str = typer.Option("512MB", "--memory-budget", help="Memory for tensor blocks in flight."),
    threads: int = typer.Option(2, "--threads", help="Threads of the default in-process scheduler."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Start a dask LocalCluster with N worker processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Join a running dask scheduler at ADDRESS."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="Join the dask cluster described by this file (dask-jobqueue, dask-mpi)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Convert a Transformer checkpoint to MM-Rec, streaming one tensor at a time."""
    from mmrec.shards import parse_size
    from mmrec.streaming.graph import SchedulerChoice

    for option, value in (("--max-shard-size", max_shard_size), ("--memory-budget", memory_budget)):
        try:
            parse_size(value)
        except ValueError as exc:
            raise fail(f"{option}: {exc}", EXIT_USAGE) from None
    for option, value in (("--threads", threads), ("--workers", workers)):
        if value is not None and value < 1:
            raise fail(f"{option} must be at least 1, got {value}", EXIT_USAGE)
    sizes = dict(vocab_size=vocab_size, model_dim=model_dim, num_layers=num_layers, num_heads=num_heads,
                 ffn_dim=ffn_dim)
    check_plan_options(mapping, layer_map, dtype, sizes, init)
    overrides = {k: v for k, v in sizes.items() if v is not None}
    with clean_errors(debug):
        from mmrec.streaming.convert import ConvertOptions, convert, make_plan
        from mmrec.streaming.report import build_report, summary_text

        options = ConvertOptions(
            source=source, output=output, overrides=overrides, mapping=mapping, mapping_file=mapping_file,
            layer_map=layer_map, strict=strict, initialize_new=not no_initialize_new, dtype=dtype, seed=seed,
            init=init, max_shard_size=max_shard_size, memory_budget=memory_budget,
            scheduler=SchedulerChoice(threads=threads, workers=workers, address=scheduler,
                                      scheduler_file=str(scheduler_file) if scheduler_file else None),
            resume=resume, overwrite=overwrite, quiet=quiet or json_output)
        if dry_run:
            _, _, plan = make_plan(options)
            typer.echo(plan.to_json() if json_output else summary_text(build_report(plan)))
            return
        report = convert(options)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(summary_text(report))
        typer.echo(f"wrote {output}")
