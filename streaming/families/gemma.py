"""Gemma: the LLaMA layout; its RMSNorms compute x * (1 + w), so the stored w becomes w + 1 (exact, 0.8)."""

from __future__ import annotations

import dataclasses

from .base import Family, LLAMA_KEYS, llama_global_roles, llama_layer_roles, llama_sizes, register

PLUS_ONE = ({"op": "add", "value": 1.0},)


@register
class Gemma(Family):
    model_types = ("gemma",)
    sizes = llama_sizes("gelu_pytorch_tanh", markers=(),
                        keys={**LLAMA_KEYS, "hidden_act": ("hidden_activation", "hidden_act")})

    def roles(self, a, names):
        glob, layer = llama_global_roles(), llama_layer_roles()
        glob["final_norm"] = dataclasses.replace(glob["final_norm"], transforms=PLUS_ONE)
        for r in ("attn_norm", "mlp_norm"):
            layer[r] = dataclasses.replace(layer[r], transforms=PLUS_ONE)
        return glob, layer

    def warnings(self, a):
        return ["gemma scales its embeddings by sqrt(model_dim) at run time; MM-Rec does not, so the "
                "embedding is copied unscaled (fine-tuning adapts)"]
