"""`mmrec shard-convert`: the product's main command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .errors import EXIT_REFUSED, EXIT_USAGE, clean_errors, fail
from .plan_options import (DEFAULT_INIT_MODE, FLAG, SIZE_NAMES, Debug, Dtype, FfnDim, FfnDimAlias, Init,
                           LayerMap, LayerMapAlias, Mapping, MappingFile, MappingFileAlias, ModelDim, ModelDimAlias,
                           NoInitializeNew, NoInitializeNewAlias, NumHeads, NumHeadsAlias, NumLayers, NumLayersAlias,
                           Seed, Strict, VocabSize, VocabSizeAlias, check_plan_options, check_size_option,
                           merge_underscore_aliases, recheck_sizes_for_source)


def shard_convert(
    source: str = typer.Option(..., "--source", metavar="PATH|URL",
                               help="Checkpoint file or directory to convert, or a URL (https://.../dir/, "
                                    "hf://org/name[@revision]: docs/remote.md)."),
    output: Path = typer.Option(..., "--output", metavar="PATH",
                                help="Output directory, or a single .safetensors file."),
    vocab_size: VocabSize = None,
    model_dim: ModelDim = None,
    num_layers: NumLayers = None,
    num_heads: NumHeads = None,
    ffn_dim: FfnDim = None,
    strict: Strict = False,
    no_initialize_new: NoInitializeNew = False,
    mapping: Mapping = "default",
    mapping_file: MappingFile = None,
    layer_map: LayerMap = None,
    dtype: Dtype = None,
    seed: Seed = 0,
    init: Init = DEFAULT_INIT_MODE,
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE",
                                       help="Largest output shard, with a unit (decimal: 5GB = 5e9 bytes; "
                                            "MiB/GiB binary)."),
    memory_budget: str = typer.Option("512MB", "--memory-budget", metavar="SIZE",
                                      help="Memory for tensor blocks in flight, with a unit."),
    threads: int = typer.Option(2, "--threads", metavar="N", help="Threads of the default in-process scheduler."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N",
                                          help="Start a dask LocalCluster with N worker processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                            help="Join a running dask scheduler at ADDRESS."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", metavar="FILE",
                                                  help="Join the dask cluster described by this file "
                                                       "(dask-jobqueue, dask-mpi)."),
    resume: bool = typer.Option(False, "--resume", metavar=FLAG,
                                help="Continue an interrupted run into the same output."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar=FLAG, help="Replace an existing output."),
    dry_run: bool = typer.Option(False, "--dry-run", metavar=FLAG,
                                 help="Print the plan and write nothing; exit 3 if the real run would be refused."),
    json_output: bool = typer.Option(False, "--json", metavar=FLAG,
                                     help="Print the report (with --dry-run: the plan) as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG,
                               help="Print nothing on success but what --json asks for; errors still go to "
                                    "stderr."),
    debug: Debug = False,
    # the original CLI's underscore spellings, accepted but not listed
    vocab_size_: VocabSizeAlias = None,
    model_dim_: ModelDimAlias = None,
    num_layers_: NumLayersAlias = None,
    num_heads_: NumHeadsAlias = None,
    ffn_dim_: FfnDimAlias = None,
    no_initialize_new_: NoInitializeNewAlias = False,
    mapping_file_: MappingFileAlias = None,
    layer_map_: LayerMapAlias = None,
) -> None:
    """Convert a Transformer checkpoint to MM-Rec, streaming one tensor at a time."""
    from mmrec.streaming.graph import SchedulerChoice
    from mmrec.streaming.sources.paths import source_argument

    source = source_argument(source)  # a Path, or a URL kept whole

    check_size_option("--max-shard-size", max_shard_size)
    check_size_option("--memory-budget", memory_budget)
    for option, value in (("--threads", threads), ("--workers", workers)):
        if value is not None and value < 1:
            raise fail(f"{option} must be at least 1, got {value}", EXIT_USAGE)
    merged = merge_underscore_aliases(locals())
    sizes = {name: merged[name] for name in SIZE_NAMES}
    no_initialize_new, mapping_file = merged["no_initialize_new"], merged["mapping_file"]
    layer_map = merged["layer_map"] or "first"
    check_plan_options(mapping, layer_map, dtype, sizes, init)
    overrides = {k: v for k, v in sizes.items() if v is not None}
    with clean_errors(debug, resumable=True):
        from mmrec.streaming.convert import ConvertOptions, convert, make_plan
        from mmrec.streaming.plan.model import PlanError
        from mmrec.streaming.report import build_report, summary_text

        options = ConvertOptions(
            source=source, output=output, overrides=overrides, mapping=mapping, mapping_file=mapping_file,
            layer_map=layer_map, strict=strict, initialize_new=not no_initialize_new, dtype=dtype, seed=seed,
            init=init, max_shard_size=max_shard_size, memory_budget=memory_budget,
            scheduler=SchedulerChoice(threads=threads, workers=workers, address=scheduler,
                                      scheduler_file=str(scheduler_file) if scheduler_file else None),
            resume=resume, overwrite=overwrite, quiet=quiet or json_output)
        try:
            if dry_run:
                catalog, _, plan = make_plan(options)
            else:
                report = convert(options)
        except PlanError:
            recheck_sizes_for_source(source, sizes)  # exit 2 if --num_heads & co. caused it
            raise
        if dry_run:
            if json_output:
                typer.echo(plan.to_json())
            elif not quiet:
                typer.echo(summary_text(build_report(plan)))
            refusal = _refusal(options, plan, catalog)
            if refusal is not None:
                raise fail(f"{refusal} (dry run: nothing was written; the real run would be refused)",
                           EXIT_REFUSED)
            if not quiet:
                typer.echo(f"dry run: nothing was written to {output}", err=True)
            return
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        typer.echo(summary_text(report))
        typer.echo(f"wrote {output}")


def _refusal(options, plan, catalog) -> str | None:
    """The refusal the real run would meet on this output (read-only: a dry run writes nothing)."""
    from mmrec.shards import parse_size
    from mmrec.streaming.convert import run_identity
    from mmrec.streaming.layout import output_paths, plan_layout
    from mmrec.streaming.output import OutputRefused, OutputState, check_not_inside_source

    try:
        check_not_inside_source(options.source, Path(options.output))
        directory, single = output_paths(Path(options.output))
        identity = None
        if options.resume:  # compared with the interrupted run's, as the real run does
            layout = plan_layout(plan, parse_size(options.max_shard_size), single)
            identity = run_identity(plan, layout, catalog)
        OutputState(directory, single).check(options.resume, options.overwrite, identity)
    except OutputRefused as exc:
        return " ".join(str(exc).split())
    return None
