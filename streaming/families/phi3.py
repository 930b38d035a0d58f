"""Phi-3: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows) are split by rows."""

from __future__ import annotations

from .base import Family, Src, kv_dim, llama_global_roles, llama_sizes, q_dim, register, rows


@register
class Phi3(Family):
    model_types = ("phi3",)
    sizes = llama_sizes(ffn_tensor="layers.0.mlp.gate_up_proj.weight", ffn_div=2, q_tensor=None, k_tensor=None,
                        markers=("layers.0.self_attn.qkv_proj.weight", "layers.0.mlp.gate_up_proj.weight"))

    def roles(self, a, names):
        p = "layers.{i}."
        qd, kvd, f = q_dim(a), kv_dim(a), int(a.ffn_dim)
        qkv, gate_up = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        layer = {
            "attn_norm": Src(p + "input_layernorm.weight"),
            "mlp_norm": Src(p + "post_attention_layernorm.weight"),
            "q": rows(qkv, 0, qd), "k": rows(qkv, qd, qd + kvd), "v": rows(qkv, qd + kvd, qd + 2 * kvd),
            "o": Src(p + "self_attn.o_proj.weight"),
            "gate": rows(gate_up, 0, f), "up": rows(gate_up, f, 2 * f),  # HF: gate, up = chunk(2)
            "down": Src(p + "mlp.down_proj.weight"),
        }
        return llama_global_roles(), layer
