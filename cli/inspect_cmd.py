"""`mmrec inspect SOURCE`: what a checkpoint is, from its headers only (no torch import, no tensor read)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mmrec.streaming.analysis import analyze
from mmrec.streaming.sources import open_source
from mmrec.streaming.sources.paths import source_argument

from .errors import clean_errors

# Rows of the readable table: (label, SourceAnalysis field).
_ROWS = [("model type", "model_type"), ("layout", "layout"), ("vocab size", "vocab_size"),
         ("model dim", "model_dim"), ("layers", "num_layers"), ("heads", "num_heads"),
         ("kv heads", "num_kv_heads"), ("head dim", "head_dim"), ("ffn dim", "ffn_dim"),
         ("activation", "hidden_act"), ("gated mlp", "gated_mlp"), ("norm eps", "norm_eps"),
         ("tied embeddings", "tied_embeddings"), ("dtype", "dtype"), ("parameters", "num_parameters"),
         ("bytes", "total_bytes")]


def inspect(source: str = typer.Argument(..., metavar="SOURCE",
                                         help="Checkpoint file or directory (any supported layout), or a URL "
                                              "(docs/remote.md)."),
            json_output: bool = typer.Option(False, "--json", metavar="",
                                             help="Print one JSON object instead of a table."),
            debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks.")):
    """Analyse a source checkpoint from its headers and config files."""
    source = source_argument(source)  # a Path, or a URL kept whole
    with clean_errors(debug):
        catalog = open_source(source)
        analysis = analyze(catalog)
        aux_files = list(catalog.aux_files)  # for a URL source: probed here, where a server failure is one line
    data = analysis.to_dict()
    if json_output:
        data["source"] = str(catalog.root)
        data["num_tensors"] = len(catalog.tensors)
        data["aux_files"] = [str(p) for p in aux_files]
        print(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from mmrec.streaming.terminal import escape

    # Text cells: what a file holds ("[bold red]", escape sequences) is shown as it is, never interpreted.
    table = Table(title=Text(escape(source)), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for label, field in _ROWS:
        value = data[field]
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        if field in analysis.guessed:
            text += "  (guessed from shapes)"
        table.add_row(label, Text(escape(text)))
    table.add_row("tensors", str(len(catalog.tensors)))
    table.add_row("files", Text("\n".join(escape(Path(f).name) for f in analysis.files)))
    if aux_files:
        table.add_row("copied files", Text(escape(", ".join(p.name for p in aux_files))))
    Console().print(table)
