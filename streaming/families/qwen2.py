"""Qwen2: the LLaMA layout plus q/k/v biases."""

from __future__ import annotations

from .base import Family, Src, llama_global_roles, llama_layer_roles, llama_sizes, register


@register
class Qwen2(Family):
    model_types = ("qwen2",)
    # q/k/v biases tell a config-less qwen2 from a llama (more markers are tried first)
    sizes = llama_sizes(markers=("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.bias",
                                 "layers.0.mlp.gate_proj.weight"))

    def roles(self, a, names):
        layer = llama_layer_roles()
        for r in ("q", "k", "v"):
            layer[f"{r}_bias"] = Src(f"layers.{{i}}.self_attn.{r}_proj.bias")
        return llama_global_roles(), layer
