"""Conversion init modes (`--init`): what the tensors a source cannot fill start as.

The mapping decides which target tensors come from the source; an init mode then decides what the tensors it
leaves new start as (a tensor the mapping fills is never touched, except the memory attention's output
projection below), deterministically, as plain plan data (docs/init-modes.md has the rules and measurements):

- `guide`       the base rule (docs/init-modes.md): Xavier-uniform weights, zero biases, unit norms.
- `zero-mixer`  `guide`, but the new mixer's paths into the residual stream start at zero (W_z, W_v and
                the memory attention's W_o; weights and biases): each block is the source's MLP on the
                residual stream, and the mixer adds nothing until trained. W_o is zeroed even where the
                mapping copies o_proj into it: past the first memory write (8192 tokens) a copied o_proj
                adds one pooled vector to every token (measured: +0.9 nats of held-out loss there).
- `self-attend` (default) `zero-mixer`, but W_v = 10 · o_proj · v_proj (grouped k/v heads repeated), so
                each block adds 0.1 · W_v · norm1(x) = what the source's attention adds when every token
                attends only to itself. A product of two source tensors is a `matmul` recipe, computed in
                row blocks like any transform.

Adding a mode is one subclass with `@register`.
"""

from __future__ import annotations

from typing import ClassVar

from .mapping import MapEntry
from .model import SCORE_PARTIAL, PlanError, TensorPlan

VALUE_SCALE = 10.0  # the block adds 0.1 · v (docs/mmrec-v1.md, forward step 5); W_v = 10 · o · v undoes the 0.1
# The mixer's paths into the residual stream: h (through W_z), 0.1 · v (W_v), the memory context c (W_o).
NEW_RESIDUAL_PATHS = ("W_z.weight", "W_z.bias", "W_v.weight", "W_v.bias")  # zeroed when the mapping leaves them new
MEMORY_OUTPUT = ("multi_mem_attention.W_o.weight", "multi_mem_attention.W_o.bias")  # zeroed always


class InitMode:
    name: ClassVar[str]

    def apply(self, tensors: list[TensorPlan], planner) -> list[TensorPlan]:
        return tensors


INIT_MODES: dict[str, InitMode] = {}


def register(cls: type[InitMode]) -> type[InitMode]:
    INIT_MODES[cls.name] = cls()
    return cls


def get_init_mode(name: str) -> InitMode:
    if name not in INIT_MODES:
        raise PlanError(f"--init must be one of {', '.join(INIT_MODES)}, got {name!r}")
    return INIT_MODES[name]


def _block_suffix(name: str) -> str | None:
    parts = name.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "blocks" else None


def _zeros(tp: TensorPlan) -> TensorPlan:
    return TensorPlan(tp.name, tp.dtype, tp.shape, "init", [], [], "zeros", 0.0)


@register
class Guide(InitMode):
    name = "guide"


@register
class ZeroMixer(InitMode):
    name = "zero-mixer"

    def apply(self, tensors, planner):
        def zeroed(tp: TensorPlan) -> bool:
            suffix = _block_suffix(tp.name)
            return suffix in MEMORY_OUTPUT or (tp.kind == "init" and suffix in NEW_RESIDUAL_PATHS)

        out = []
        for tp in tensors:
            if zeroed(tp):
                planner.reasons.setdefault(tp.name, f"zeroed by --init {self.name}")
                tp = _zeros(tp)
            out.append(tp)
        return out


@register
class SelfAttend(InitMode):
    name = "self-attend"

    def apply(self, tensors, planner):
        out = []
        for tp in ZeroMixer().apply(tensors, planner):
            if tp.kind == "init" and _block_suffix(tp.name) == "W_v.weight" and \
                    planner.lmap[int(tp.name.split(".")[1])] is not None:
                tp = self._value_product(tp, planner) or tp
            out.append(tp)
        return out

    @staticmethod
    def _value_product(tp: TensorPlan, planner) -> TensorPlan | None:
        """W_v = 10 · o_proj · v_proj, or None when the source has no such pair of the right shapes."""
        o = planner.resolve(MapEntry(tp.name, role="o"), tp.name)
        v = planner.resolve(MapEntry(tp.name, role="v", repeat_kv=True), tp.name,
                            rows=None if isinstance(o, str) else o[2][1])
        if isinstance(o, str) or isinstance(v, str):
            return None
        (o_name, o_ops, o_shape, *_), (v_name, v_ops, v_shape, *_) = o, v
        if len(o_shape) != 2 or len(v_shape) != 2 or o_shape[1] != v_shape[0] or \
                (o_shape[0], v_shape[1]) != tuple(tp.shape):
            return None
        product = {"op": "matmul", "scale": VALUE_SCALE, "left": o_ops, "right": v_ops}
        return TensorPlan(tp.name, tp.dtype, tp.shape, "transform", [o_name, v_name], [product], None,
                          SCORE_PARTIAL)


DEFAULT_INIT_MODE = "self-attend"
