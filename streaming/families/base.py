"""What a source family is, in one place per family: how analysis reads its sizes (`SizeSpec`, analysis)
and which source tensor fills each role (embed, q, up, ...) with which transforms (`roles`, mapping;
docs/conversion.md).

A family module declares one `Family` subclass and decorates it with `@register`; the package imports
every module in this folder, so adding a family touches one place: a new module.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # analysis imports the families: the type is for readers and checkers only
    from ..analysis import SourceAnalysis

@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeSpec:
    """Where analysis finds a family's sizes: tensor names (normalized) and config keys."""

    embedding: str
    head: str
    layer_prefix: str  # layer i's tensors start with f"{layer_prefix}{i}."
    ffn_tensor: str  # in layer 0; gives ffn_dim
    ffn_axis: int = 0  # which axis of ffn_tensor is ffn_dim
    ffn_div: int = 1  # ffn_tensor's axis holds ffn_div * ffn_dim (phi3's fused gate_up)
    q_tensor: str | None  # q rows = heads * head_dim (None: fused, read from config)
    k_tensor: str | None
    keys: dict  # field -> config keys tried in order
    hidden_act: str  # default activation
    gated_mlp: bool
    markers: tuple[str, ...]  # normalized names (layer 0) that identify the family without a config
    ffn_default_4x: bool = False  # the config's ffn size may be null for "4 * model_dim" (gpt2-style): not a guess
    reads_tie_flag: bool = True  # whether the config's tie_word_embeddings applies (not Meta's params.json)


LLAMA_KEYS = {"vocab_size": ("vocab_size",), "model_dim": ("hidden_size",),
              "num_layers": ("num_hidden_layers",), "num_heads": ("num_attention_heads",),
              "num_kv_heads": ("num_key_value_heads",), "head_dim": ("head_dim",),
              "ffn_dim": ("intermediate_size",), "hidden_act": ("hidden_act",),
              "norm_eps": ("rms_norm_eps",), "tied_embeddings": ("tie_word_embeddings",)}
GPT2_KEYS = {"vocab_size": ("vocab_size",), "model_dim": ("n_embd", "hidden_size"),
             "num_layers": ("n_layer", "num_hidden_layers"), "num_heads": ("n_head", "num_attention_heads"),
             "ffn_dim": ("n_inner",), "hidden_act": ("activation_function",),
             "norm_eps": ("layer_norm_epsilon",), "tied_embeddings": ("tie_word_embeddings",)}


def llama_sizes(hidden_act: str = "silu", markers=("layers.0.self_attn.q_proj.weight",
                                                    "layers.0.mlp.gate_proj.weight"), **changes) -> SizeSpec:
    """The Hugging Face LLaMA layout's sizes, shared by llama, mistral, qwen2, gemma."""
    spec = SizeSpec(embedding="embed_tokens.weight", head="lm_head.weight", layer_prefix="layers.",
                    ffn_tensor="layers.0.mlp.up_proj.weight", q_tensor="layers.0.self_attn.q_proj.weight",
                    k_tensor="layers.0.self_attn.k_proj.weight", keys=LLAMA_KEYS, hidden_act=hidden_act,
                    gated_mlp=True, markers=markers)
    return dataclasses.replace(spec, **changes)


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
    sizes: ClassVar[SizeSpec]  # how analysis reads this family's sizes
    other_sizes: ClassVar[tuple[SizeSpec, ...]] = ()  # the family under other tensor names (Meta's own llama)
    layouts: ClassVar[dict[str, SizeSpec]] = {}  # a source layout that is always this family (Meta's "meta")
    norm_is_layernorm: ClassVar[bool] = False  # LayerNorm (weight + bias): norms transfer at 0.5

    def roles(self, a: SourceAnalysis, names: set[str]) -> tuple[dict[str, Src], dict[str, Src]]:
        """({global role: Src}, {layer role: Src}) for analysis `a` and the catalog's tensor names."""
        raise NotImplementedError

    def warnings(self, a: SourceAnalysis) -> list[str]:
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


def kv_dim(a: SourceAnalysis) -> int:
    """Rows of a k/v projection: num_kv_heads * head_dim."""
    heads = a.num_kv_heads or a.num_heads
    return int(heads) * int(a.head_dim or a.model_dim // a.num_heads)


def q_dim(a: SourceAnalysis) -> int:
    return int(a.num_heads) * int(a.head_dim or a.model_dim // a.num_heads)
