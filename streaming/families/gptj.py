"""GPT-J: one LayerNorm per layer (ln_1, read by the attention and the parallel MLP) fills norm1 and norm2.

Its lm_head has a bias, which MM-Rec's head lacks: that bias is dropped.
"""

from __future__ import annotations

from .base import Family, GPT2_KEYS, SizeSpec, Src, norm, register


@register
class GPTJ(Family):
    model_types = ("gptj",)
    sizes = SizeSpec(embedding="wte.weight", head="lm_head.weight", layer_prefix="h.",
                     ffn_tensor="h.0.mlp.fc_in.weight", q_tensor="h.0.attn.q_proj.weight",
                     k_tensor="h.0.attn.k_proj.weight", keys=GPT2_KEYS, hidden_act="gelu_new", gated_mlp=False,
                     markers=("h.0.attn.q_proj.weight", "h.0.mlp.fc_in.weight"), ffn_default_4x=True)
    norm_is_layernorm = True

    def roles(self, a, names):
        p = "h.{i}."
        glob = {"embed": Src("wte.weight"), "lm_head": Src("lm_head.weight"),
                "final_norm": norm("ln_f.weight", True)}
        layer = {
            "attn_norm": norm(p + "ln_1.weight", True), "mlp_norm": norm(p + "ln_1.weight", True),
            "q": Src(p + "attn.q_proj.weight"), "k": Src(p + "attn.k_proj.weight"),
            "v": Src(p + "attn.v_proj.weight"), "o": Src(p + "attn.out_proj.weight"),
            "up": Src(p + "mlp.fc_in.weight"), "up_bias": Src(p + "mlp.fc_in.bias"),
            "down": Src(p + "mlp.fc_out.weight"), "down_bias": Src(p + "mlp.fc_out.bias"),
        }
        return glob, layer
