"""Mistral: the Hugging Face LLaMA layout (sliding-window attention changes nothing in the weights)."""

from __future__ import annotations

from .base import Family, llama_global_roles, llama_layer_roles, llama_sizes, register


@register
class Mistral(Family):
    model_types = ("mistral",)
    sizes = llama_sizes()

    def roles(self, a, names):
        return llama_global_roles(), llama_layer_roles()
