"""build_plan: one TensorPlan per target parameter, from the family's roles and the mapping table.

Pure: reads only headers (catalog.tensors) and the analysis; the same inputs give the same plan.
"""

from __future__ import annotations

import copy

from mmrec.schema import parameter_specs

from ..analysis import SourceAnalysis
from ..transforms import infer_shape, keeps_meaning
from ..families import FAMILIES, get_family
from ..families.base import kv_dim
from .layers import build_layer_map
from .init_modes import DEFAULT_INIT_MODE, get_init_mode
from .mapping import ModelWeightConverter, target_layer
from .model import SCORE_COPY, SCORE_EXACT, SCORE_NEW, SCORE_PARTIAL, ConversionPlan, PlanError, TensorPlan
from .target import build_target_config, output_dtype

VOCAB_TENSORS = ("embedding.weight", "lm_head.weight")


class _Planner:
    def __init__(self, catalog, a, cfg, out_dtype, converter, roles, lmap):
        self.catalog, self.a, self.cfg, self.out_dtype = catalog, a, cfg, out_dtype
        self.converter, self.lmap = converter, lmap
        self.glob, self.layer = roles
        self.names = catalog.tensors
        self.mismatches: list[dict] = []
        self.reasons: dict[str, str] = {}  # why a target is new
        self.missing_named: list[str] = []  # the mapping named a source that is not there
        self.vocab_note: str | None = None

    def new(self, spec, reason: str) -> TensorPlan:
        self.reasons[spec.name] = reason
        return TensorPlan(spec.name, self.out_dtype, tuple(spec.shape), "init", [], [], spec.init, SCORE_NEW)

    def tensor(self, spec) -> TensorPlan:
        t_layer = target_layer(spec.name)
        if t_layer is not None and self.lmap[t_layer] is None:
            return self.new(spec, "no source layer")
        entry = self.converter.entry_for(spec.name)
        if entry is None or entry.is_new:
            return self.new(spec, "no mapping")
        return self.from_entry(spec, entry)

    def resolve(self, entry, target_key: str, rows: int | None = None):
        """(source name, ops, shape, lossy, neutral) of `entry` for `target_key`, or a reason it has none.

        `rows`: the row count wanted, so grouped-query k/v heads are repeated up to it (entry.repeat_kv).
        """
        t_layer = target_layer(target_key)
        ops: list[dict] = []
        lossy, neutral = False, 0
        if entry.role:
            src = (self.layer if t_layer is not None else self.glob).get(entry.role)
            if src is None:
                return f"the source family has no '{entry.role}' tensor"
            pattern, ops, lossy = src.pattern, list(src.transforms), src.lossy
            neutral = len(src.transforms) if src.neutral else 0
        else:
            pattern = entry.source
        ops += [dict(op) for op in entry.transforms]
        name = self.converter.find_source(pattern, target_key, self.names)
        if name is None:
            self.missing_named.append(f"{target_key} <- {self.converter.expand(pattern, target_key)}")
            return f"source tensor '{self.converter.expand(pattern, target_key)}' not found"
        try:
            shape = infer_shape(ops, tuple(self.names[name].shape))
            if entry.repeat_kv and shape and shape[0] != rows and self._grouped(shape):
                ops.append({"op": "repeat_kv_heads", "num_kv_heads": int(self.a.num_kv_heads),
                            "num_heads": int(self.a.num_heads)})
                shape = infer_shape(ops[-1:], shape)
        except ValueError as exc:
            raise PlanError(f"{target_key} <- {name}: {exc}") from None
        return name, ops, shape, lossy, neutral

    def from_entry(self, spec, entry) -> TensorPlan:
        """The plan of `spec` filled as `entry` says (a role or a source pattern), or a new tensor."""
        resolved = self.resolve(entry, spec.name, spec.shape[0] if spec.shape else None)
        if isinstance(resolved, str):
            return self.new(spec, resolved)
        name, ops, shape, lossy, neutral = resolved
        st = self.names[name]
        partial = lossy
        if shape != tuple(spec.shape):
            if spec.name in VOCAB_TENSORS and len(shape) == 2 and shape[1:] == tuple(spec.shape[1:]):
                v_src, v = shape[0], spec.shape[0]
                ops.append({"op": "slice_rows", "start": 0, "stop": v} if v < v_src
                           else {"op": "pad_rows", "rows": v - v_src, "fill": "mean"})
                partial = True
                self.vocab_note = (f"vocabulary {v_src} -> {v}: rows " +
                                   ("truncated" if v < v_src else "added with the mean of the source rows") +
                                   " (score 0.5)")
            else:
                self.mismatches.append({"target": spec.name, "source": name, "target_shape": list(spec.shape),
                                        "source_shape": list(shape)})
                return self.new(spec, f"shape {list(spec.shape)} differs from the source's {list(shape)}")
        if st.dtype != self.out_dtype:
            ops.append({"op": "cast", "dtype": self.out_dtype})
        structural = [op for op in ops[neutral:] if not keeps_meaning(op)]
        score = entry.score if entry.score is not None else (
            SCORE_PARTIAL if partial else SCORE_EXACT if structural else SCORE_COPY)
        return TensorPlan(spec.name, self.out_dtype, tuple(spec.shape), "transform" if ops else "copy",
                          [name], ops, None, score)

    def _grouped(self, shape) -> bool:
        a = self.a
        return bool(a.num_kv_heads and a.num_heads and a.num_kv_heads < a.num_heads
                    and shape[0] == kv_dim(a))


def plan(catalog, analysis, overrides: dict | None = None, *, mapping: str = "default",
         mapping_file=None, layer_map: str | list = "first", strict: bool = False,
         initialize_new: bool = True, dtype: str | None = None, seed: int = 0,
         converter: ModelWeightConverter | None = None, init: str = DEFAULT_INIT_MODE) -> ConversionPlan:
    """The plan for `catalog`, given its analysis (a SourceAnalysis, or its dict read back from a report)."""
    a = SourceAnalysis.from_dict(analysis) if isinstance(analysis, dict) else analysis
    init_mode = get_init_mode(init)
    if converter is not None and (mapping_file is not None or mapping != "default"):
        raise PlanError("give --mapping / --mapping-file to the converter itself, not beside it")
    converter = converter or ModelWeightConverter(mapping, mapping_file)
    family = get_family(a.model_type)
    if family is None and converter.mapping_file is None:
        raise PlanError(f"unknown model family {a.model_type!r} (known: "
                        f"{', '.join(sorted(FAMILIES))}); describe its tensors in a custom mapping file "
                        f"with --mapping-file")
    out_dtype = output_dtype(dtype, a, catalog)
    cfg, warnings = build_target_config(a, overrides, out_dtype)
    lmap = build_layer_map(layer_map, a.num_layers or 0, cfg.num_layers)
    converter = copy.copy(converter)  # the caller's converter stays as given; this plan's copy knows the layers
    converter.layer_map = lmap
    roles = family.roles(a, set(catalog.tensors)) if family else ({}, {})
    p = _Planner(catalog, a, cfg, out_dtype, converter, roles, lmap)
    tensors = [p.tensor(spec) for spec in parameter_specs(cfg)]
    tensors = init_mode.apply(tensors, p)

    new = [tp for tp in tensors if tp.kind == "init"]
    if strict and new:
        shown = "; ".join(f"{tp.name} ({p.reasons[tp.name]})" for tp in new[:5])
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        raise PlanError(f"--strict: {len(new)} target tensor(s) cannot come from the source: {shown}{more}. "
                        f"Drop --strict, or map them in --mapping-file")
    used = {s for tp in tensors for s in tp.sources}
    dropped = [n for n in catalog.tensors if n not in used]
    if family:
        warnings += family.warnings(a)
        if family.norm_is_layernorm:
            warnings.append(f"{a.model_type} uses LayerNorm: its norm weights become RMSNorm weights, biases "
                            "dropped (score 0.5)")
    warnings += _layer_warnings(lmap, a.num_layers or 0, layer_map)
    if p.vocab_note:
        warnings.append(p.vocab_note)
    if p.mismatches:
        warnings.append(f"{len(p.mismatches)} target tensor(s) differ in shape from their source and start new")
    if p.missing_named:
        warnings.append(f"{len(p.missing_named)} mapped source tensor(s) are missing, e.g. "
                        f"{p.missing_named[0]}")
    guessed = a.guessed
    if guessed:
        warnings.append(f"source values guessed from tensor shapes, not read from a config: "
                        f"{', '.join(sorted(guessed))}")
    if not initialize_new:
        tensors = [tp for tp in tensors if tp.kind != "init"]
    options = {"overrides": {k: v for k, v in (overrides or {}).items() if v is not None},
               **converter.describe(), "layer_map": layer_map, "strict": strict,
               "initialize_new": initialize_new, "dtype": out_dtype, "seed": seed, "init": init_mode.name}
    source = dict(analysis) if isinstance(analysis, dict) else analysis.to_dict()
    result = ConversionPlan(cfg.to_dict(), tensors, dropped, lmap, warnings, source, seed, options, p.mismatches)
    share = result.summary()["transferred_parameter_share"]
    if share < 0.5:
        result.warnings.append(f"<50% transferred ({share:.1%} of the parameters): architectures differ a lot")
    return result


def _layer_warnings(lmap: list[int | None], source_layers: int, spec) -> list[str]:
    out = []
    unused = sorted(set(range(source_layers)) - {s for s in lmap if s is not None})
    if unused:
        out.append(f"source layers {_ranges(unused)} have no target layer (--layer-map {spec}) and are dropped")
    new = [i for i, s in enumerate(lmap) if s is None]
    if new:
        out.append(f"target layers {_ranges(new)} have no source layer and start new")
    return out


def _ranges(xs: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)
