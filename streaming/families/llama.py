"""LLaMA: Hugging Face names, and Meta's own (consolidated.*.pth + params.json) names.

Meta stores wq/wk in its rotary order (pairs interleaved); `rotary_meta_to_hf` brings them to the Hugging
Face order, so both layouts of one model give identical bytes (and identical scores: the permute only
restores the canonical layout).
"""

from __future__ import annotations

from .base import Family, SizeSpec, Src, llama_global_roles, llama_layer_roles, llama_sizes, register


def is_meta(names: set[str]) -> bool:
    return "tok_embeddings.weight" in names or any(n.endswith("attention.wq.weight") for n in names)


def meta_roles(a) -> tuple[dict[str, Src], dict[str, Src]]:
    heads, kv_heads = int(a.num_heads), int(a.num_kv_heads or a.num_heads)
    p = "layers.{i}."
    glob = {"embed": Src("tok_embeddings.weight"), "lm_head": Src("output.weight"),
            "final_norm": Src("norm.weight")}
    layer = {
        "attn_norm": Src(p + "attention_norm.weight"), "mlp_norm": Src(p + "ffn_norm.weight"),
        "q": Src(p + "attention.wq.weight", ({"op": "rotary_meta_to_hf", "num_heads": heads},), neutral=True),
        "k": Src(p + "attention.wk.weight", ({"op": "rotary_meta_to_hf", "num_heads": kv_heads},),
                 neutral=True),
        "v": Src(p + "attention.wv.weight"), "o": Src(p + "attention.wo.weight"),
        "gate": Src(p + "feed_forward.w1.weight"), "up": Src(p + "feed_forward.w3.weight"),
        "down": Src(p + "feed_forward.w2.weight"),
    }
    return glob, layer


# Meta's own names for the llama family (params.json instead of config.json).
META_SIZES = SizeSpec(embedding="tok_embeddings.weight", head="output.weight", layer_prefix="layers.",
                      ffn_tensor="layers.0.feed_forward.w1.weight", q_tensor="layers.0.attention.wq.weight",
                      k_tensor="layers.0.attention.wk.weight",
                      keys={"vocab_size": ("vocab_size",), "model_dim": ("dim",), "num_layers": ("n_layers",),
                            "num_heads": ("n_heads",), "num_kv_heads": ("n_kv_heads",), "norm_eps": ("norm_eps",)},
                      hidden_act="silu", gated_mlp=True,
                      markers=("tok_embeddings.weight", "layers.0.attention.wq.weight"), reads_tie_flag=False)


@register
class Llama(Family):
    model_types = ("llama",)
    sizes = llama_sizes()
    other_sizes = (META_SIZES,)  # Meta names in a plain .pth file
    layouts = {"meta": META_SIZES}  # consolidated.NN.pth + params.json

    def roles(self, a, names):
        if is_meta(names):
            return meta_roles(a)
        return llama_global_roles(), llama_layer_roles()
