"""GPT-2: Conv1D weights stored [in, out] (transposed to Linear form), fused c_attn split into q, k, v.

LayerNorm weights stand in for RMSNorm weights (bias dropped: 0.5); position embeddings have no place.
"""

from __future__ import annotations

from .base import Family, GPT2_KEYS, SizeSpec, Src, norm, register, rows, transpose


@register
class GPT2(Family):
    model_types = ("gpt2",)
    sizes = SizeSpec(embedding="wte.weight", head="lm_head.weight", layer_prefix="h.",
                     ffn_tensor="h.0.mlp.c_fc.weight", ffn_axis=1, q_tensor=None, k_tensor=None, keys=GPT2_KEYS,
                     hidden_act="gelu_new", gated_mlp=False, markers=("h.0.attn.c_attn.weight",), ffn_default_4x=True)
    norm_is_layernorm = True

    def roles(self, a, names):
        d, p = int(a.model_dim), "h.{i}."
        w, b = p + "attn.c_attn.weight", p + "attn.c_attn.bias"
        glob = {"embed": Src("wte.weight"), "lm_head": Src("lm_head.weight"),
                "final_norm": norm("ln_f.weight", True)}
        layer = {
            "attn_norm": norm(p + "ln_1.weight", True), "mlp_norm": norm(p + "ln_2.weight", True),
            "q": rows(w, 0, d, transposed=True), "k": rows(w, d, 2 * d, transposed=True),
            "v": rows(w, 2 * d, 3 * d, transposed=True),
            "q_bias": rows(b, 0, d), "k_bias": rows(b, d, 2 * d), "v_bias": rows(b, 2 * d, 3 * d),
            "o": transpose(p + "attn.c_proj.weight"), "o_bias": Src(p + "attn.c_proj.bias"),
            "up": transpose(p + "mlp.c_fc.weight"), "up_bias": Src(p + "mlp.c_fc.bias"),
            "down": transpose(p + "mlp.c_proj.weight"), "down_bias": Src(p + "mlp.c_proj.bias"),
        }
        return glob, layer
