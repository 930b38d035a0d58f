"""The founding guide's Python interface, kept working:

    converted_weights, report = convert_model_weights(source_checkpoint_path, target_model,
                                                      output_path=None, strict=False, initialize_new=True)
    model.load_state_dict(converted_weights, strict=False)

The conversion always streams to disk (output_path, or a temporary directory) and `converted_weights` is a
lazy mapping of memory-map views of the result, so loading it copies tensor by tensor and the model is
never held twice in memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mmrec.checkpoint import LazyStateDict

from .convert import ConvertOptions, convert
from .plan.mapping import ModelWeightConverter

_SIZE_FIELDS = ("vocab_size", "model_dim", "num_layers", "num_heads", "ffn_dim")


def convert_model_weights(source_checkpoint_path, target_model, output_path=None, strict: bool = False,
                          initialize_new: bool = True, converter: ModelWeightConverter | None = None,
                          **options):
    """Convert `source_checkpoint_path` to the sizes of `target_model` (an MMRecModel, possibly on meta).

    Returns (converted_weights, report). Extra keyword options go to ConvertOptions (e.g. dtype,
    max_shard_size, layer_map, mapping, seed).
    """
    config = target_model.config
    overrides = {field: getattr(config, field) for field in _SIZE_FIELDS}
    if output_path is None:
        # Kept alive by the returned mapping: the memory maps need the files.
        workdir = tempfile.TemporaryDirectory(prefix="mmrec-convert-")
        output = Path(workdir.name) / "converted"
    else:
        workdir, output = None, Path(output_path)
        if output.suffix == ".pt":  # the guide's example names a .pt file; we write safetensors
            output = output.with_suffix(".safetensors")
    report = convert(ConvertOptions(source=Path(source_checkpoint_path), output=output, overrides=overrides,
                                    strict=strict, initialize_new=initialize_new, converter=converter,
                                    quiet=True, **options))
    weights = LazyStateDict(output)
    weights.workdir = workdir
    _warn_if_model_differs(report, config)
    return weights, report


def _warn_if_model_differs(report: dict, config) -> None:
    """The plan follows the source for everything but the five sizes (a gated FFN, an untied head, the
    source's activation, inner_dim = D/4...). Say where the caller's model was built otherwise:
    load_state_dict(strict=False) would skip or refuse those tensors."""
    target = report["target_config"]
    ours = config.to_dict()
    for field in sorted(set(target) | set(ours)):
        if field in ("torch_dtype", "model_type") or target.get(field) == ours.get(field):
            continue
        report["warnings"].append(
            f"the converted checkpoint has {field}={target.get(field)!r} but target_model has "
            f"{ours.get(field)!r}; build the model with MMRecModel.from_pretrained(output) or "
            f"MMRecConfig.from_dict(report['target_config']) to use every converted tensor")
