"""`mmrec plan SOURCE`: what a conversion would do — mapping, transforms, new tensors — from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import clean_errors
from .plan_options import DEFAULT_INIT_MODE, INIT_HELP, check_plan_options


def _size(*names: str, help: str):
    return typer.Option(None, *names, help=help, min=1)


def plan(source: Path = typer.Argument(..., help="Checkpoint file or directory (any supported layout)."),
         vocab_size: Optional[int] = _size("--vocab_size", "--vocab-size", help="Target vocabulary (default: source's)."),
         model_dim: Optional[int] = _size("--model_dim", "--model-dim", help="Target hidden size D."),
         num_layers: Optional[int] = _size("--num_layers", "--num-layers", help="Target layers."),
         num_heads: Optional[int] = _size("--num_heads", "--num-heads", help="Target memory-attention heads."),
         ffn_dim: Optional[int] = _size("--ffn_dim", "--ffn-dim", help="Target FFN width."),
         mapping: str = typer.Option("default", "--mapping", help="Mapping table: default or extended."),
         mapping_file: Optional[Path] = typer.Option(None, "--mapping-file", "--mapping_file",
                                                     help="Custom mapping (JSON or YAML)."),
         layer_map: str = typer.Option("first", "--layer-map", "--layer_map",
                                       help="first, uniform, or a list like 0,2,4,new."),
         strict: bool = typer.Option(False, "--strict", help="Fail if any target tensor cannot come from the source."),
         no_initialize_new: bool = typer.Option(False, "--no_initialize_new", "--no-initialize-new",
                                                help="Plan only converted tensors (a partial checkpoint)."),
         dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (default: the source's)."),
         seed: int = typer.Option(0, "--seed", help="Seed of new components."),
         init: str = typer.Option(DEFAULT_INIT_MODE, "--init", help=INIT_HELP),
         json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Plan a conversion to MM-Rec and print its summary (no tensor data is read)."""
    overrides = {"vocab_size": vocab_size, "model_dim": model_dim, "num_layers": num_layers,
                 "num_heads": num_heads, "ffn_dim": ffn_dim}
    check_plan_options(mapping, layer_map, dtype, overrides, init)
    with clean_errors(debug):
        from mmrec.streaming.analysis import analyze
        from mmrec.streaming.plan import build_plan
        from mmrec.streaming.report import build_report, summary_text
        from mmrec.streaming.sources import open_source

        catalog = open_source(source)
        result = build_plan(catalog, analyze(catalog), overrides, mapping=mapping, mapping_file=mapping_file,
                            layer_map=layer_map, strict=strict, initialize_new=not no_initialize_new,
                            dtype=dtype, seed=seed, init=init)
    if json_output:
        print(result.to_json())
    else:
        print(summary_text(build_report(result)))
