"""The parameter schema of MM-Rec v1 (docs/mmrec-v1.md "Parameters"): names, shapes and init rules.

This is the single source of truth shared by the runtime (which builds modules with these names) and the
conversion engine (which plans one output tensor per entry). Nothing here allocates memory.
"""

from __future__ import annotations

import dataclasses
import math

from .config import MMRecConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    # How a converter initialises it when no source provides it: "zeros", "ones" or "xavier_uniform".
    init: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# The definition of converter-made values (mmrec/init.py, and the values init modes compute, e.g. the
# self-attend product); bumped whenever one changes. Recorded in every conversion report.
INIT_FORMAT = 2


def init_rule(name: str, ndim: int) -> str:
    """Conversion-init rule (docs/mmrec-v1.md "Initialization"; `--init guide` in docs/init-modes.md) for one
    parameter name."""
    if name.endswith(".bias"):
        return "zeros"
    leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
    if leaf.startswith("norm") or name == "norm.weight":
        return "ones"
    if ndim >= 2:
        return "xavier_uniform"
    return "zeros"


def block_param_shapes(config: MMRecConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(suffix, shape) for every parameter of one block, in checkpoint order."""
    D, F, I = config.model_dim, config.ffn_dim, config.inner_dim
    out: list[tuple[str, tuple[int, ...]]] = []
    for proj in ("W_q", "W_k", "W_v", "W_z", "W_g"):
        out += [(f"{proj}.weight", (D, D)), (f"{proj}.bias", (D,))]
    out += [("norm1.weight", (D,)), ("norm2.weight", (D,))]
    out += [("mdi.W_g.weight", (D, 2 * D)), ("mdi.W_g.bias", (D,))]
    for mlp in ("W_gamma", "W_context"):
        out += [(f"mdi.{mlp}.0.weight", (I, D)), (f"mdi.{mlp}.0.bias", (I,)),
                (f"mdi.{mlp}.2.weight", (D, I)), (f"mdi.{mlp}.2.bias", (D,))]
    out += [("multi_mem_attention.W_q.weight", (D, D)), ("multi_mem_attention.W_q.bias", (D,)),
            ("multi_mem_attention.W_o.weight", (D, D)), ("multi_mem_attention.W_o.bias", (D,))]
    out += [("ffn.0.weight", (F, D)), ("ffn.0.bias", (F,)), ("ffn.3.weight", (D, F)), ("ffn.3.bias", (D,))]
    if config.ffn_gated:
        out += [("ffn_gate.weight", (F, D)), ("ffn_gate.bias", (F,))]
    return out


def parameter_specs(config: MMRecConfig, include_tied: bool = False) -> list[ParamSpec]:
    """Every stored parameter in checkpoint order.

    With tied embeddings `lm_head.weight` is not stored (it *is* `embedding.weight`); pass
    include_tied=True to list it anyway, as `state_dict()` does.
    """
    V, D = config.vocab_size, config.model_dim
    names: list[tuple[str, tuple[int, ...]]] = [("embedding.weight", (V, D))]
    for i in range(config.num_layers):
        names += [(f"blocks.{i}.{suffix}", shape) for suffix, shape in block_param_shapes(config)]
    names.append(("norm.weight", (D,)))
    if include_tied or not config.tie_word_embeddings:
        names.append(("lm_head.weight", (V, D)))
    return [ParamSpec(n, s, init_rule(n, len(s))) for n, s in names]


def parameter_count(config: MMRecConfig) -> int:
    """Number of distinct parameters (a tied head counts once)."""
    return sum(spec.numel for spec in parameter_specs(config))
