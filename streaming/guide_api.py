"""The original Python conversion interface (convert_model_weights), kept working, and made to build the right model:

    config = target_config(source_checkpoint_path, vocab_size=..., model_dim=..., num_layers=...,
                           num_heads=..., ffn_dim=...)   # the source's architecture at these sizes
    model = MMRecModel(config)
    converted_weights, report = convert_model_weights(source_checkpoint_path, model,
                                                      output_path=None, strict=False, initialize_new=True)
    model.load_state_dict(converted_weights, strict=True)

The plan takes only the five sizes from the target; everything else (a gated SiLU FFN and an untied head
for a LLaMA, the source's activation and norm eps, inner_dim = D/4...) follows the source. A target model
built otherwise (`MMRecModel(vocab_size=..., ...)` with the config defaults is GELU, ungated, tied) cannot hold the
conversion: convert_model_weights raises TargetModelError naming each field that differs, before writing
anything. `target_model=None` converts at the source's own sizes; `converted_weights.config` is then the
MMRecConfig to build the model with.

The conversion always streams to disk (output_path, or a temporary directory) and `converted_weights` is a
lazy mapping of memory-map views of the result, so loading it copies tensor by tensor and the model is
never held twice in memory.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from mmrec.checkpoint import LazyStateDict
from mmrec.config import MMRecConfig

from .convert import ConvertOptions, convert, make_plan
from .plan.mapping import ModelWeightConverter
from .plan.target import OVERRIDE_KEYS

# Fields a model may set as it likes: they change neither the parameters nor what they compute in eval.
_FREE_FIELDS = ("dropout", "torch_dtype", "extra")


class TargetModelError(ValueError):
    """target_model is built with a config that cannot hold the conversion; the message names the fields."""


class ConvertedWeights(LazyStateDict):
    """The written checkpoint as a lazy state dict, `.config` its MMRecConfig. For a tied config the head's
    name is an alias of the embedding (the files store it once), so the mapping is the whole state dict of
    `MMRecModel(self.config)` and `load_state_dict(..., strict=True)` takes it."""

    def __init__(self, path, workdir=None):
        super().__init__(path)
        self.workdir = workdir  # a TemporaryDirectory kept alive by this mapping: the maps need the files
        names = set(super().__iter__())
        self._aliases = ({"lm_head.weight": "embedding.weight"}
                         if self.config.tie_word_embeddings and "embedding.weight" in names
                         and "lm_head.weight" not in names else {})

    def __getitem__(self, name: str):
        return super().__getitem__(self._aliases.get(name, name))

    def __iter__(self):
        yield from super().__iter__()
        yield from self._aliases

    def __len__(self) -> int:
        return super().__len__() + len(self._aliases)


def target_config(source_checkpoint_path, vocab_size: int | None = None, model_dim: int | None = None,
                  num_layers: int | None = None, num_heads: int | None = None, ffn_dim: int | None = None,
                  converter: ModelWeightConverter | None = None, **options) -> MMRecConfig:
    """The MMRecConfig a conversion of `source_checkpoint_path` writes: the source's architecture at the
    sizes given (None keeps the source's). Reads headers only. Extra keyword options go to ConvertOptions
    (e.g. dtype, mapping, layer_map), as for convert_model_weights."""
    sizes = dict(vocab_size=vocab_size, model_dim=model_dim, num_layers=num_layers, num_heads=num_heads,
                 ffn_dim=ffn_dim)
    return _planned_config(source_checkpoint_path, {k: v for k, v in sizes.items() if v is not None},
                           converter=converter, **options)


def convert_model_weights(source_checkpoint_path, target_model=None, output_path=None, strict: bool = False,
                          initialize_new: bool = True, converter: ModelWeightConverter | None = None,
                          **options):
    """Convert `source_checkpoint_path` to the sizes of `target_model` (an MMRecModel, possibly on meta, or
    an MMRecConfig; None keeps the source's sizes).

    Returns (converted_weights, report): a ConvertedWeights mapping (`.config` is the MMRecConfig written)
    and the conversion report. Raises TargetModelError, before writing anything, when target_model's
    config differs from the conversion's in anything but dropout and dtype. Extra keyword options go to
    ConvertOptions (e.g. dtype, max_shard_size, layer_map, mapping, seed).
    """
    config = _config_of(target_model)
    overrides = {} if config is None else {field: getattr(config, field) for field in OVERRIDE_KEYS}
    plan_args = dict(strict=strict, initialize_new=initialize_new, converter=converter, **options)
    if config is not None:
        _check_target(source_checkpoint_path, config,
                      _planned_config(source_checkpoint_path, overrides, **plan_args))
    if output_path is None:
        workdir = tempfile.TemporaryDirectory(prefix="mmrec-convert-")
        output = Path(workdir.name) / "converted"
    else:
        workdir, output = None, Path(output_path)
        if output.suffix == ".pt":  # a .pt output name (the original API's example): we write safetensors
            output = output.with_suffix(".safetensors")
    report = convert(ConvertOptions(source=Path(source_checkpoint_path), output=output, overrides=overrides,
                                    quiet=True, **plan_args))
    return ConvertedWeights(output, workdir), report


def _config_of(target_model) -> MMRecConfig | None:
    if target_model is None or isinstance(target_model, MMRecConfig):
        return target_model
    config = getattr(target_model, "config", None)
    if not isinstance(config, MMRecConfig):
        raise TypeError(f"target_model must be an MMRecModel, an MMRecConfig or None, "
                        f"got {type(target_model).__name__}")
    return config


def _planned_config(source, overrides: dict, **options) -> MMRecConfig:
    """The plan's target config (headers only; nothing is written)."""
    options.setdefault("quiet", True)
    _, _, plan = make_plan(ConvertOptions(source=Path(source), output=Path(source), overrides=overrides,
                                          **options))
    return MMRecConfig.from_dict(plan.target_config)


def _check_target(source, ours: MMRecConfig, planned: MMRecConfig) -> None:
    """Every field but the free ones must be the conversion's: otherwise load_state_dict(strict=False)
    would skip tensors (ffn_gate), tie an untied head, or run the weights with another activation."""
    differ = [f.name for f in dataclasses.fields(MMRecConfig)
              if f.name not in _FREE_FIELDS and getattr(ours, f.name) != getattr(planned, f.name)]
    if not differ:
        return
    diffs = ", ".join(f"{name}={getattr(ours, name)!r} vs {getattr(planned, name)!r}" for name in differ)
    sizes = ", ".join(f"{field}={getattr(ours, field)}" for field in OVERRIDE_KEYS)
    raise TargetModelError(
        f"target_model cannot hold the conversion of {str(source)!r}: {diffs} (target_model vs conversion); "
        f"build it with MMRecModel(target_config({str(source)!r}, {sizes})), target_config from "
        f"mmrec.streaming.guide_api")
