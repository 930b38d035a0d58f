"""The conversion plan (docs/conversion.md): what every output tensor is made from."""

from __future__ import annotations

from pathlib import Path

from .mapping import ModelWeightConverter
from .model import ConversionPlan, PlanError, TensorPlan


def build_plan(catalog, analysis, overrides: dict | None = None, *, mapping: str = "default",
               mapping_file: Path | None = None, layer_map: str | list = "first", strict: bool = False,
               initialize_new: bool = True, dtype: str | None = None, seed: int = 0,
               converter: ModelWeightConverter | None = None, init: str | None = None) -> ConversionPlan:
    """Plan a conversion from headers only. overrides: the target sizes vocab_size, model_dim, num_layers,
    num_heads, ffn_dim (absent -> follow the source). `init` names the rule for the tensors the source
    cannot fill (plan/init_modes.py; None = the default mode). Raises PlanError naming the option or tensor."""
    from .init_modes import DEFAULT_INIT_MODE
    from .planner import plan

    return plan(catalog, analysis, overrides, mapping=mapping, mapping_file=mapping_file, layer_map=layer_map,
                strict=strict, initialize_new=initialize_new, dtype=dtype, seed=seed, converter=converter,
                init=init or DEFAULT_INIT_MODE)


__all__ = ["ConversionPlan", "ModelWeightConverter", "PlanError", "TensorPlan", "build_plan"]
