"""One rule for quoting a value from a file or an option in an error message: short, on one line.

A 5000-digit integer (whose repr Python refuses past 4300 digits), a huge list or a long string would
otherwise turn an error into a wall of text; every message that quotes a value it did not choose uses `short`.
"""

from __future__ import annotations

from typing import Any

LONG_INT_BITS = 200  # about 60 digits: larger integers are described, not printed


def short(value: Any, limit: int = 60) -> str:
    """repr of `value`, cut to about `limit` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > LONG_INT_BITS:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer nested deep inside, or absurd nesting
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[: limit - 4] + " ..."
