"""The one escaping function for text that reaches the terminal (RELIABILITY.md, hostile-input class 4).

Names and strings taken from a file (tensor names, config values, paths) can hold escape sequences, NUL,
newlines or bidi overrides that would retitle or clear the user's terminal, or fake an error line. Every
such text that is printed goes through `escape`: control and format characters become visible escapes
(`\\x1b`, `\\n`, `\\u202e`), so what is printed is one line and inert. Ordinary text, including non-ASCII
letters, is unchanged.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 controls and DEL; Cf: format characters (bidi overrides, zero-width); Zl/Zp: line and paragraph
# separators; Cs: lone surrogates (from surrogateescape'd bytes).
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def _escaped(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: object, keep_newlines: bool = False) -> str:
    """`text` (str() of it) with every control or format character replaced by a visible escape.
    With keep_newlines, "\\n" stays (for multi-line output we build ourselves; each line is escaped)."""
    text = str(text)
    if text.isprintable():  # the common case: nothing to do (isprintable() is False for all we escape)
        return text
    out = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif ch != " " and unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            out.append(_escaped(ch))
        else:
            out.append(ch)
    return "".join(out)
