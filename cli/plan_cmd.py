"""`mmrec plan SOURCE`: what a conversion would do — mapping, transforms, new tensors — from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import clean_errors
from .plan_options import (DEFAULT_INIT_MODE, FLAG, INIT_HELP, check_plan_options, check_sizes_for_source,
                           SIZE_NAMES, hidden_alias, merge_guide_spellings, size_option)


def plan(source: Path = typer.Argument(..., metavar="SOURCE",
                                       help="Checkpoint file or directory (any supported layout)."),
         vocab_size: Optional[int] = size_option("vocab_size", "Target vocabulary (default: source's)."),
         model_dim: Optional[int] = size_option("model_dim", "Target hidden size D."),
         num_layers: Optional[int] = size_option("num_layers", "Target layers."),
         num_heads: Optional[int] = size_option("num_heads", "Target memory-attention heads."),
         ffn_dim: Optional[int] = size_option("ffn_dim", "Target FFN width."),
         mapping: str = typer.Option("default", "--mapping", metavar="TABLE",
                                     help="Mapping table: default or extended."),
         mapping_file: Optional[Path] = typer.Option(None, "--mapping-file", metavar="FILE",
                                                     help="Custom mapping (JSON or YAML)."),
         layer_map: Optional[str] = typer.Option(None, "--layer-map", metavar="MAP",
                                                 help="first (default), uniform, or a list like 0,2,4,new."),
         strict: bool = typer.Option(False, "--strict", metavar=FLAG,
                                     help="Fail if any target tensor cannot come from the source."),
         no_initialize_new: bool = typer.Option(False, "--no-initialize-new", metavar=FLAG,
                                                help="Plan only converted tensors (a partial checkpoint; or "
                                                     "--no_initialize_new)."),
         dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE",
                                             help="Output dtype (default: the source's)."),
         seed: int = typer.Option(0, "--seed", metavar="INT", help="Seed of new components."),
         init: str = typer.Option(DEFAULT_INIT_MODE, "--init", metavar="MODE", help=INIT_HELP),
         json_output: bool = typer.Option(False, "--json", metavar=FLAG, help="Print the plan as JSON."),
         debug: bool = typer.Option(False, "--debug", metavar=FLAG, help="Show tracebacks."),
         # the guide's underscore spellings, accepted but not listed
         vocab_size_: Optional[int] = hidden_alias("vocab_size"),
         model_dim_: Optional[int] = hidden_alias("model_dim"),
         num_layers_: Optional[int] = hidden_alias("num_layers"),
         num_heads_: Optional[int] = hidden_alias("num_heads"),
         ffn_dim_: Optional[int] = hidden_alias("ffn_dim"),
         no_initialize_new_: bool = hidden_alias("no_initialize_new", flag=True),
         mapping_file_: Optional[Path] = hidden_alias("mapping_file"),
         layer_map_: Optional[str] = hidden_alias("layer_map")):
    """Plan a conversion to MM-Rec and print its summary (no tensor data is read)."""
    merged = merge_guide_spellings(locals())
    overrides = {name: merged[name] for name in SIZE_NAMES}
    no_initialize_new, mapping_file = merged["no_initialize_new"], merged["mapping_file"]
    layer_map = merged["layer_map"] or "first"
    check_plan_options(mapping, layer_map, dtype, overrides, init)
    with clean_errors(debug):
        from mmrec.streaming.analysis import analyze
        from mmrec.streaming.plan import build_plan
        from mmrec.streaming.report import build_report, summary_text
        from mmrec.streaming.sources import open_source

        catalog = open_source(source)
        analysis = analyze(catalog)
        check_sizes_for_source(analysis, overrides)  # exit 2 when --num_heads & co. do not fit this source
        result = build_plan(catalog, analysis, overrides, mapping=mapping, mapping_file=mapping_file,
                            layer_map=layer_map, strict=strict, initialize_new=not no_initialize_new,
                            dtype=dtype, seed=seed, init=init)
    if json_output:
        print(result.to_json())
    else:
        print(summary_text(build_report(result)))
