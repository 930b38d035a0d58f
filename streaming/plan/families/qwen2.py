"""Qwen2: the LLaMA layout plus q/k/v biases."""

from __future__ import annotations

from .base import Family, Src, llama_global_roles, llama_layer_roles, register


@register
class Qwen2(Family):
    model_types = ("qwen2",)

    def roles(self, a, names):
        layer = llama_layer_roles()
        for r in ("q", "k", "v"):
            layer[f"{r}_bias"] = Src(f"layers.{{i}}.self_attn.{r}_proj.bias")
        return llama_global_roles(), layer
