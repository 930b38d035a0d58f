"""The conversion plan: plain, JSON-able data that the executor runs and the report describes.

A plan is a pure function of (source headers, target config, options); it holds no tensor data, so it
can be printed, saved, compared between runs (resume checks) and shipped to workers.
"""

from __future__ import annotations

import dataclasses
import math
import json
from typing import Any

# Scores (docs/conversion.md "Scores"): copied as is, exact transform, partial/lossy, not transferred.
SCORE_COPY, SCORE_EXACT, SCORE_PARTIAL, SCORE_NEW = 1.0, 0.8, 0.5, 0.0
SCORES = (SCORE_COPY, SCORE_EXACT, SCORE_PARTIAL, SCORE_NEW)


class PlanError(ValueError):
    """A conversion that cannot be planned; the message names the option or tensor at fault."""


@dataclasses.dataclass
class TensorPlan:
    name: str                  # target MM-Rec name (mmrec.schema.parameter_specs)
    dtype: str                 # output safetensors dtype code
    shape: tuple[int, ...]
    kind: str                  # 'copy' | 'transform' | 'init'
    sources: list[str]         # catalog names; [] for init
    transforms: list[dict]     # JSON-able ops applied in order (streaming/transforms.py)
    init: str | None = None    # 'zeros' | 'ones' | 'xavier_uniform' when kind == 'init'
    score: float = SCORE_NEW

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "kind": self.kind,
                "sources": list(self.sources), "transforms": [dict(t) for t in self.transforms],
                "init": self.init, "score": self.score}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorPlan":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(int(s) for s in d["shape"]),
                   kind=d["kind"], sources=list(d.get("sources", [])),
                   transforms=[dict(t) for t in d.get("transforms", [])], init=d.get("init"),
                   score=float(d.get("score", SCORE_NEW)))


@dataclasses.dataclass
class ConversionPlan:
    target_config: dict                 # MMRecConfig.to_dict(), torch_dtype = output dtype name
    tensors: list[TensorPlan]           # parameter_specs order; init ones omitted if initialize_new=False
    dropped: list[str]                  # source tensors with no place
    layer_map: list[int | None]         # target layer i <- source layer (None = new)
    warnings: list[str]
    source_analysis: dict
    seed: int
    options: dict
    # target/source pairs whose shapes differ (the target then starts new); an addition to the contract.
    shape_mismatches: list[dict] = dataclasses.field(default_factory=list)

    # -- lookups and summary numbers ----------------------------------------------------------------
    def tensor(self, name: str) -> TensorPlan:
        for tp in self.tensors:
            if tp.name == name:
                return tp
        raise KeyError(name)

    def target_specs(self):
        """Every target parameter (mmrec.schema), including those a partial plan leaves out."""
        from mmrec.config import MMRecConfig
        from mmrec.schema import parameter_specs

        return parameter_specs(MMRecConfig.from_dict(self.target_config))

    def summary(self) -> dict[str, Any]:
        specs = self.target_specs()
        converted = [tp for tp in self.tensors if tp.kind != "init"]
        planned = {tp.name for tp in self.tensors}
        total_params = sum(s.numel for s in specs)
        moved = sum(tp.numel for tp in converted)
        weighted = sum(tp.numel * tp.score for tp in converted)
        return {
            "total_keys": len(specs),
            "converted_keys": len(converted),
            "new_keys": sum(1 for tp in self.tensors if tp.kind == "init"),
            "omitted_keys": sum(1 for s in specs if s.name not in planned),
            "total_parameters": total_params,
            "transferred_parameters": moved,
            "transferred_parameter_share": moved / total_params if total_params else 0.0,
            "score_weighted_share": weighted / total_params if total_params else 0.0,
            "output_bytes": sum(tp.numel * _dtype_size(tp.dtype) for tp in self.tensors),
        }

    # -- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"target_config": self.target_config, "tensors": [tp.to_dict() for tp in self.tensors],
                "dropped": list(self.dropped), "layer_map": list(self.layer_map),
                "warnings": list(self.warnings), "source_analysis": self.source_analysis,
                "seed": self.seed, "options": self.options, "shape_mismatches": self.shape_mismatches}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConversionPlan":
        return cls(target_config=d["target_config"], tensors=[TensorPlan.from_dict(t) for t in d["tensors"]],
                   dropped=list(d.get("dropped", [])), layer_map=list(d.get("layer_map", [])),
                   warnings=list(d.get("warnings", [])), source_analysis=d.get("source_analysis", {}),
                   seed=int(d.get("seed", 0)), options=d.get("options", {}),
                   shape_mismatches=list(d.get("shape_mismatches", [])))

    @classmethod
    def from_json(cls, s: str) -> "ConversionPlan":
        return cls.from_dict(json.loads(s))


def _dtype_size(code: str) -> int:
    from mmrec.safetensors_format import DTYPE_SIZES

    return DTYPE_SIZES[code]
