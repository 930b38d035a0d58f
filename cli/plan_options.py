"""Checks shared by every command that plans a conversion (`plan`, `shard-convert`): an option whose value
is malformed is refused up front with exit 2, before any file is read."""

from __future__ import annotations

from mmrec.streaming.plan.init_modes import DEFAULT_INIT_MODE, INIT_MODES

from .errors import EXIT_USAGE, fail

INIT_HELP = (f"How tensors the source cannot fill start: {', '.join(INIT_MODES)} "
             f"(default {DEFAULT_INIT_MODE}; docs/init-modes.md).")


def check_plan_options(mapping: str, layer_map: str, dtype: str | None, sizes: dict[str, int | None],
                       init: str = DEFAULT_INIT_MODE) -> None:
    if init not in INIT_MODES:
        raise fail(f"--init must be one of {', '.join(INIT_MODES)}, got {init!r}", EXIT_USAGE)
    if mapping not in ("default", "extended"):
        raise fail(f"--mapping must be 'default' or 'extended', got {mapping!r} (a custom table goes in "
                   "--mapping-file)", EXIT_USAGE)
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise fail(f"--{name} must be a positive integer, got {value}", EXIT_USAGE)
    from mmrec.streaming.plan.model import PlanError

    try:
        if dtype is not None:
            from mmrec.streaming.plan.target import dtype_code

            dtype_code(dtype)
        if layer_map not in ("first", "uniform"):
            from mmrec.streaming.plan.layers import parse_layer_list

            parse_layer_list(layer_map)  # its syntax; its length is checked against the source later
    except PlanError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
