"""GPT-Neo: Linear q/k/v/out projections (no q/k/v biases), LayerNorms, GPT-2-style names otherwise."""

from __future__ import annotations

from .base import Family, GPT2_KEYS, SizeSpec, Src, norm, register


@register
class GPTNeo(Family):
    model_types = ("gpt_neo",)
    sizes = SizeSpec(embedding="wte.weight", head="lm_head.weight", layer_prefix="h.",
                     ffn_tensor="h.0.mlp.c_fc.weight", q_tensor="h.0.attn.attention.q_proj.weight",
                     k_tensor="h.0.attn.attention.k_proj.weight",
                     keys={**GPT2_KEYS, "model_dim": ("hidden_size",), "num_layers": ("num_layers",),
                           "num_heads": ("num_heads",), "ffn_dim": ("intermediate_size",)},
                     hidden_act="gelu_new", gated_mlp=False, markers=("h.0.attn.attention.q_proj.weight",),
                     ffn_default_4x=True)
    norm_is_layernorm = True

    def roles(self, a, names):
        p, at = "h.{i}.", "h.{i}.attn.attention."
        glob = {"embed": Src("wte.weight"), "lm_head": Src("lm_head.weight"),
                "final_norm": norm("ln_f.weight", True)}
        layer = {
            "attn_norm": norm(p + "ln_1.weight", True), "mlp_norm": norm(p + "ln_2.weight", True),
            "q": Src(at + "q_proj.weight"), "k": Src(at + "k_proj.weight"), "v": Src(at + "v_proj.weight"),
            "o": Src(at + "out_proj.weight"), "o_bias": Src(at + "out_proj.bias"),
            "up": Src(p + "mlp.c_fc.weight"), "up_bias": Src(p + "mlp.c_fc.bias"),
            "down": Src(p + "mlp.c_proj.weight"), "down_bias": Src(p + "mlp.c_proj.bias"),
        }
        return glob, layer
