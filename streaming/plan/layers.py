"""--layer-map: which source layer fills each target layer (None = the layer starts new)."""

from __future__ import annotations

import json

from .model import PlanError


def parse_layer_list(spec: str) -> list[int | None]:
    spec = spec.strip()
    try:
        items = json.loads(spec) if spec.startswith("[") else [s.strip() for s in spec.split(",")]
    except json.JSONDecodeError as exc:
        raise PlanError(f"--layer-map: {spec!r} is not a JSON list ({exc})") from None
    if not isinstance(items, list):
        raise PlanError(f"--layer-map: {spec!r} is not a list of layer numbers")
    return [layer_index(item) for item in items]


def layer_index(item, where: str = "--layer-map") -> int | None:
    """One entry of a layer map: a non-negative integer, or None / 'new' (the layer starts new). A fraction
    (1.5, "1.5"), a bool, a non-finite number or anything else is refused, never truncated."""
    if item is None or (isinstance(item, str) and item.strip().lower() in ("new", "none", "null", "-")):
        return None
    if isinstance(item, int) and not isinstance(item, bool):
        value = item
    elif isinstance(item, str) and item.strip().lstrip("+-").isdigit() and len(item.strip()) <= 20:
        value = int(item.strip())
    else:
        shown = repr(item if not isinstance(item, str) else item[:60])
        raise PlanError(f"{where}: {shown} is not a layer number (a whole number >= 0, or 'new')")
    if value < 0:
        raise PlanError(f"{where}: layer {value} is negative")
    return value


def build_layer_map(spec: str | list, source_layers: int, target_layers: int) -> list[int | None]:
    """'first' (the default: target i <- source i), 'uniform' (evenly spaced when the target has fewer
    layers) or an explicit list 'a,b,c' / JSON list with one entry per target layer ('new' = none)."""
    s, t = int(source_layers or 0), int(target_layers)
    if isinstance(spec, str) and spec == "first":
        return [i if i < s else None for i in range(t)]
    if isinstance(spec, str) and spec == "uniform":
        if t >= s:
            return [i if i < s else None for i in range(t)]
        if t == 1:
            return [0]
        # round(i * (s-1) / (t-1)) in integers: first and last layers are kept
        return [(2 * i * (s - 1) + (t - 1)) // (2 * (t - 1)) for i in range(t)]
    layers = [layer_index(x) for x in spec] if isinstance(spec, list) else parse_layer_list(str(spec))
    if len(layers) != t:
        raise PlanError(f"--layer-map lists {len(layers)} layers but the target has {t} (--num_layers)")
    for i, layer in enumerate(layers):
        if layer is not None and not 0 <= layer < s:
            raise PlanError(f"--layer-map: target layer {i} <- source layer {layer}, but the source has "
                            f"layers 0..{s - 1}")
    return layers
