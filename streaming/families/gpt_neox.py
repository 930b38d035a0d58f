"""GPT-NeoX (Pythia): fused query_key_value interleaved per head — rows are (head, [q|k|v], head_dim)."""

from __future__ import annotations

from .base import Family, LLAMA_KEYS, SizeSpec, Src, norm, register


def _qkv(pattern: str, heads: int, part: int) -> Src:
    return Src(pattern, ({"op": "take_heads", "num_heads": heads, "parts": 3, "part": part},))


@register
class GPTNeoX(Family):
    model_types = ("gpt_neox",)
    sizes = SizeSpec(embedding="embed_in.weight", head="embed_out.weight", layer_prefix="layers.",
                     ffn_tensor="layers.0.mlp.dense_h_to_4h.weight", q_tensor=None, k_tensor=None,
                     keys={**LLAMA_KEYS, "num_kv_heads": (), "head_dim": (), "norm_eps": ("layer_norm_eps",)},
                     hidden_act="gelu", gated_mlp=False, markers=("layers.0.attention.query_key_value.weight",))
    norm_is_layernorm = True

    def roles(self, a, names):
        p, h = "layers.{i}.", int(a.num_heads)
        w, b = p + "attention.query_key_value.weight", p + "attention.query_key_value.bias"
        head = "embed_out.weight" if "embed_out.weight" in names else "lm_head.weight"
        glob = {"embed": Src("embed_in.weight"), "lm_head": Src(head),
                "final_norm": norm("final_layer_norm.weight", True)}
        layer = {
            "attn_norm": norm(p + "input_layernorm.weight", True),
            "mlp_norm": norm(p + "post_attention_layernorm.weight", True),
            "q": _qkv(w, h, 0), "k": _qkv(w, h, 1), "v": _qkv(w, h, 2),
            "q_bias": _qkv(b, h, 0), "k_bias": _qkv(b, h, 1), "v_bias": _qkv(b, h, 2),
            "o": Src(p + "attention.dense.weight"), "o_bias": Src(p + "attention.dense.bias"),
            "up": Src(p + "mlp.dense_h_to_4h.weight"), "up_bias": Src(p + "mlp.dense_h_to_4h.bias"),
            "down": Src(p + "mlp.dense_4h_to_h.weight"), "down_bias": Src(p + "mlp.dense_4h_to_h.bias"),
        }
        return glob, layer
