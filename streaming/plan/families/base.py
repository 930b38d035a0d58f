"""What a source family is: a table from roles (embed, q, up, ...) to source tensor names and transforms.

A family module declares one `Family` subclass and decorates it with `@register`; the package imports
every module in this folder, so adding a family touches one place: a new module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

# Roles a family may fill. Global roles have no layer; layer roles use '{i}' for the source layer.
GLOBAL_ROLES = ("embed", "lm_head", "final_norm")
LAYER_ROLES = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias",
               "gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@dataclasses.dataclass(frozen=True)
class Src:
    """Where a role's tensor lives in the source and how it becomes the role's canonical (HF Linear) form."""

    pattern: str                      # catalog name; '{i}' is the source layer
    transforms: tuple[dict, ...] = ()
    lossy: bool = False               # e.g. a LayerNorm weight standing in for an RMSNorm weight (0.5)
    neutral: bool = False             # the transforms only restore the canonical layout (scored as a copy)


class Family:
    """Base class: subclasses set `model_types` and implement `roles`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    norm_is_layernorm: ClassVar[bool] = False  # LayerNorm (weight + bias): norms transfer at 0.5

    def roles(self, a: Any, names: set[str]) -> tuple[dict[str, Src], dict[str, Src]]:
        """({global role: Src}, {layer role: Src}) for analysis `a` and the catalog's tensor names."""
        raise NotImplementedError

    def warnings(self, a: Any) -> list[str]:
        return []


FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    for model_type in cls.model_types:
        FAMILIES[model_type] = cls
    return cls


def norm(pattern: str, layernorm: bool) -> Src:
    """A norm weight; LayerNorm weights lose their bias and mean-centering: partial transfer."""
    return Src(pattern, lossy=layernorm)


def transpose(pattern: str) -> Src:
    """A GPT-2 Conv1D weight, stored [in, out]: the Linear form is its transpose."""
    return Src(pattern, ({"op": "transpose"},))


def rows(pattern: str, start: int, stop: int, transposed: bool = False) -> Src:
    """Rows [start, stop) of a fused tensor (after a Conv1D transpose when `transposed`)."""
    ops = ({"op": "transpose"},) if transposed else ()
    return Src(pattern, ops + ({"op": "slice_rows", "start": int(start), "stop": int(stop)},))


def llama_layer_roles(prefix: str = "layers.{i}.") -> dict[str, Src]:
    """The Hugging Face LLaMA layer layout shared by llama, mistral, qwen2, gemma."""
    return {
        "attn_norm": Src(prefix + "input_layernorm.weight"),
        "mlp_norm": Src(prefix + "post_attention_layernorm.weight"),
        "q": Src(prefix + "self_attn.q_proj.weight"), "k": Src(prefix + "self_attn.k_proj.weight"),
        "v": Src(prefix + "self_attn.v_proj.weight"), "o": Src(prefix + "self_attn.o_proj.weight"),
        "gate": Src(prefix + "mlp.gate_proj.weight"), "up": Src(prefix + "mlp.up_proj.weight"),
        "down": Src(prefix + "mlp.down_proj.weight"),
    }


def llama_global_roles() -> dict[str, Src]:
    return {"embed": Src("embed_tokens.weight"), "lm_head": Src("lm_head.weight"),
            "final_norm": Src("norm.weight")}


def kv_dim(a: Any) -> int:
    """Rows of a k/v projection: num_kv_heads * head_dim."""
    heads = a.num_kv_heads or a.num_heads
    return int(heads) * int(a.head_dim or a.model_dim // a.num_heads)


def q_dim(a: Any) -> int:
    return int(a.num_heads) * int(a.head_dim or a.model_dim // a.num_heads)
