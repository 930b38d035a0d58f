"""`mmrec plan SOURCE`: what a conversion would do — mapping, transforms, new tensors — from headers only."""

from __future__ import annotations

import typer

from .errors import clean_errors
from .plan_options import (DEFAULT_INIT_MODE, FLAG, SIZE_NAMES, Debug, Dtype, FfnDim, FfnDimAlias, Init,
                           LayerMap, LayerMapAlias, Mapping, MappingFile, MappingFileAlias, ModelDim, ModelDimAlias,
                           NoInitializeNew, NoInitializeNewAlias, NumHeads, NumHeadsAlias, NumLayers, NumLayersAlias,
                           Seed, Strict, VocabSize, VocabSizeAlias, check_plan_options, check_sizes_for_source,
                           merge_underscore_aliases)


def plan(source: str = typer.Argument(..., metavar="SOURCE",
                                      help="Checkpoint file or directory (any supported layout), or a URL "
                                           "(docs/remote.md)."),
         vocab_size: VocabSize = None, model_dim: ModelDim = None, num_layers: NumLayers = None,
         num_heads: NumHeads = None, ffn_dim: FfnDim = None, mapping: Mapping = "default",
         mapping_file: MappingFile = None, layer_map: LayerMap = None, strict: Strict = False,
         no_initialize_new: NoInitializeNew = False, dtype: Dtype = None, seed: Seed = 0,
         init: Init = DEFAULT_INIT_MODE, debug: Debug = False,
         json_output: bool = typer.Option(False, "--json", metavar=FLAG, help="Print the plan as JSON."),
         # the original CLI's underscore spellings, accepted but not listed
         vocab_size_: VocabSizeAlias = None, model_dim_: ModelDimAlias = None, num_layers_: NumLayersAlias = None,
         num_heads_: NumHeadsAlias = None, ffn_dim_: FfnDimAlias = None,
         no_initialize_new_: NoInitializeNewAlias = False, mapping_file_: MappingFileAlias = None,
         layer_map_: LayerMapAlias = None):
    """Plan a conversion to MM-Rec and print its summary (no tensor data is read)."""
    merged = merge_underscore_aliases(locals())
    overrides = {name: merged[name] for name in SIZE_NAMES}
    no_initialize_new, mapping_file = merged["no_initialize_new"], merged["mapping_file"]
    layer_map = merged["layer_map"] or "first"
    check_plan_options(mapping, layer_map, dtype, overrides, init)
    with clean_errors(debug):
        from mmrec.streaming.analysis import analyze
        from mmrec.streaming.plan import build_plan
        from mmrec.streaming.report import build_report, summary_text
        from mmrec.streaming.sources import open_source
        from mmrec.streaming.sources.paths import source_argument

        catalog = open_source(source_argument(source))
        analysis = analyze(catalog)
        check_sizes_for_source(analysis, overrides)  # exit 2 when --num_heads & co. do not fit this source
        result = build_plan(catalog, analysis, overrides, mapping=mapping, mapping_file=mapping_file,
                            layer_map=layer_map, strict=strict, initialize_new=not no_initialize_new,
                            dtype=dtype, seed=seed, init=init)
    if json_output:
        print(result.to_json())
    else:
        print(summary_text(build_report(result)))
