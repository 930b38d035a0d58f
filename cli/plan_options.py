"""Options shared by every command that plans a conversion (`plan`, `shard-convert`) and their checks: an
option whose value is malformed is refused up front with exit 2, before any file is read; one that only the
source shows wrong (`--num_heads 7` against a source of dim 64) is refused with exit 2 too, naming it.

Help shows each option once: the dashed spelling (`--vocab-size`) with a readable placeholder. The original
CLI's underscore spellings (`--vocab_size`) are accepted as hidden aliases, so the help column is never cut.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mmrec.streaming.plan.init_modes import DEFAULT_INIT_MODE, INIT_MODES
from mmrec.streaming.plan.target import OVERRIDE_KEYS

from .errors import EXIT_USAGE, fail

INIT_HELP = (f"How tensors the source cannot fill start: {', '.join(INIT_MODES)} "
             f"(default {DEFAULT_INIT_MODE}; docs/init-modes.md).")

FLAG = ""  # metavar of an on/off flag: no placeholder (typer would show <bool>)
SIZE_NAMES = OVERRIDE_KEYS  # the target sizes an option may set
# Every target size is one dimension of a planned tensor (or a count of them): 2^32 is far beyond any model,
# and refusing more up front keeps an absurd value (10^20) from reaching the planner. The planned output as
# a whole is bounded too (streaming/plan/target.py: MAX_PLANNED_BYTES).
MAX_SIZE_OPTION = 2**32


# -- the options `plan` and `shard-convert` share, declared once ------------------------------------------
# Each is an annotated type: a command writes `vocab_size: VocabSize = None`, so a help text, a metavar or a
# spelling cannot drift between the two commands.
def _size(name: str, help: str) -> Any:
    """A target size: `--model-dim N` in the help, which names the original `--model_dim` spelling too."""
    return Annotated[Optional[int], typer.Option("--" + name.replace("_", "-"), metavar="N",
                                                 help=f"{help} (or --{name})")]


VocabSize = _size("vocab_size", "Target vocabulary (pad/truncate; default: the source's).")
ModelDim = _size("model_dim", "Target hidden size D.")
NumLayers = _size("num_layers", "Target layer count.")
NumHeads = _size("num_heads", "Target memory-attention heads.")
FfnDim = _size("ffn_dim", "Target FFN width.")
Mapping = Annotated[str, typer.Option("--mapping", metavar="TABLE", help="Mapping table: default or extended.")]
MappingFile = Annotated[Optional[Path], typer.Option("--mapping-file", metavar="FILE",
                                                     help="JSON/YAML mapping that replaces or extends the table.")]
LayerMap = Annotated[Optional[str], typer.Option("--layer-map", metavar="MAP",
                                                 help="first (default), uniform, or a list like 0,2,4,new.")]
Strict = Annotated[bool, typer.Option("--strict", metavar=FLAG,
                                      help="Fail if any target tensor cannot come from the source.")]
NoInitializeNew = Annotated[bool, typer.Option("--no-initialize-new", metavar=FLAG,
                                               help="Only the converted tensors: a partial checkpoint (or "
                                                    "--no_initialize_new).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE",
                                              help="Output dtype (bfloat16, float16, float32); default: the "
                                                   "source's.")]
Seed = Annotated[int, typer.Option("--seed", metavar="INT", help="Seed of the new components' init.")]
Init = Annotated[str, typer.Option("--init", metavar="MODE", help=INIT_HELP)]
Debug = Annotated[bool, typer.Option("--debug", metavar=FLAG, help="Show tracebacks.")]


def _alias(name: str, kind: Any) -> Any:
    """The original CLI's underscore spelling of an option: accepted, not listed in the help."""
    return Annotated[kind, typer.Option(f"--{name}", hidden=True)]


VocabSizeAlias, ModelDimAlias, NumLayersAlias, NumHeadsAlias, FfnDimAlias = (
    _alias(name, Optional[int]) for name in SIZE_NAMES)
NoInitializeNewAlias = _alias("no_initialize_new", bool)
MappingFileAlias = _alias("mapping_file", Optional[Path])
LayerMapAlias = _alias("layer_map", Optional[str])


UNDERSCORE_ALIASES = (*SIZE_NAMES, "no_initialize_new", "mapping_file", "layer_map")  # options with a hidden alias


def merge_underscore_aliases(params: dict[str, Any]) -> dict[str, Any]:
    """One value for each option of UNDERSCORE_ALIASES: `params` are a command's parameters (its `locals()`),
    each option `name` beside its hidden alias `name_`; both given with different values is exit 2."""
    return {name: merge_alias(name, params[name], params[name + "_"]) for name in UNDERSCORE_ALIASES}


def merge_alias(name: str, value: Any, alias: Any) -> Any:
    """The value of an option given as --a-b or --a_b; both, with different values, is a bad option."""
    if value is None or value is False:
        return alias
    if alias is not None and alias is not False and alias != value:
        raise fail(f"--{name.replace('_', '-')} {value} and --{name} {alias} disagree; give one of them",
                   EXIT_USAGE)
    return value


def check_size_option(option: str, value: str) -> int:
    """--max-shard-size / --memory-budget: a positive size with a unit. A bare number is refused: `50`
    would mean 50 bytes (131 one-tensor shards), almost never what was meant."""
    from mmrec.shards import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise fail(f"{option}: {exc}", EXIT_USAGE) from None
    if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", value):
        raise fail(f"{option} {value.strip()}: a size needs a unit, e.g. {value.strip()}MB or {value.strip()}GB "
                   f"(decimal; MiB/GiB are binary), or {value.strip()}B if you mean bytes", EXIT_USAGE)
    return size


def check_plan_options(mapping: str, layer_map: str, dtype: str | None, sizes: dict[str, int | None],
                       init: str = DEFAULT_INIT_MODE) -> None:
    if init not in INIT_MODES:
        raise fail(f"--init must be one of {', '.join(INIT_MODES)}, got {init!r}", EXIT_USAGE)
    if mapping not in ("default", "extended"):
        raise fail(f"--mapping must be 'default' or 'extended', got {mapping!r} (a custom table goes in "
                   "--mapping-file)", EXIT_USAGE)
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise fail(f"--{name} must be a positive integer, got {value}", EXIT_USAGE)
        if value is not None and value > MAX_SIZE_OPTION:
            shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
            raise fail(f"--{name} {shown} is over the {MAX_SIZE_OPTION} limit for a target size (one dimension "
                       "of a planned tensor); nothing was read", EXIT_USAGE)
    dim, heads = sizes.get("model_dim"), sizes.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise fail(f"--num_heads {heads} must divide --model_dim {dim}", EXIT_USAGE)
    from mmrec.streaming.plan.model import PlanError

    try:
        if dtype is not None:
            from mmrec.streaming.plan.target import FLOAT_CODES, dtype_code

            if dtype_code(dtype) not in FLOAT_CODES:
                raise fail(f"--dtype {dtype}: the output dtype must be a float type (bfloat16, float16, float32 "
                           "or float64)", EXIT_USAGE)
        if layer_map not in ("first", "uniform"):
            from mmrec.streaming.plan.layers import parse_layer_list

            parse_layer_list(layer_map)  # its syntax; its length is checked against the source later
    except PlanError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def check_sizes_for_source(analysis, sizes: dict[str, int | None]) -> None:
    """Exit 2, naming the option, when the size options (not the source) make the target config invalid:
    the target built from the source alone is valid, the one with the options is not."""
    from mmrec.streaming.plan.model import PlanError
    from mmrec.streaming.plan.target import build_target_config

    overrides = {k: v for k, v in sizes.items() if v is not None}
    if not overrides:
        return
    try:
        build_target_config(analysis, overrides, "F32")
        return
    except PlanError as exc:
        problem = str(exc)
    try:
        build_target_config(analysis, {}, "F32")
    except PlanError:
        return  # the source alone fails: a bad input, not a bad option
    dim = overrides.get("model_dim", analysis.model_dim)
    heads = overrides.get("num_heads", analysis.num_heads)
    if dim % heads:
        whose = "" if "model_dim" in overrides else " (the source's; --model_dim sets another)"
        if "num_heads" in overrides:
            problem = f"--num_heads {heads} must divide the model dim {dim}{whose}"
        else:
            problem = (f"--model_dim {dim} is not a multiple of the source's {heads} heads; give --num_heads "
                       "too")
    elif "--" not in problem:
        problem += " (from " + ", ".join(f"--{k} {v}" for k, v in overrides.items()) + ")"
    raise fail(problem, EXIT_USAGE)


def recheck_sizes_for_source(source, sizes: dict[str, int | None]) -> None:
    """After a plan failed: exit 2 if the size options caused it (headers only; nothing else is read)."""
    if not any(v is not None for v in sizes.values()):
        return
    from mmrec.streaming.analysis import analyze
    from mmrec.streaming.sources import open_source

    try:
        analysis = analyze(open_source(source))
    except ValueError:
        return  # the source's own problem: the original error says it
    check_sizes_for_source(analysis, sizes)
