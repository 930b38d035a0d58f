"""Source families, registered by model_type. Every module in this folder is imported once, so a new
family is one new module that decorates its class with `@register`."""

from __future__ import annotations

import importlib
import pkgutil

from .base import FAMILIES, GLOBAL_ROLES, LAYER_ROLES, Family, Src, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_family(model_type: str | None) -> Family | None:
    cls = FAMILIES.get(model_type or "")
    return cls() if cls else None


__all__ = ["FAMILIES", "GLOBAL_ROLES", "LAYER_ROLES", "Family", "Src", "get_family", "register"]
