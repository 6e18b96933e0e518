"""Strings from clients, made safe to store, to audit and to print.

A client chooses tool names, prompt names, resource URIs, token claims, key prefixes, user
agents and the texts of the errors they cause. PostgreSQL refuses some of what a Python string
may hold: text and jsonb take no NUL, and a lone surrogate cannot be encoded as UTF-8 at all.
And whatever is appended to the audit log stays there, so its size must not be the client's to
choose.

- `storable(text)`: whether PostgreSQL takes it as text; for values looked up or stored as they
  are (names, URLs), which are refused when it does not.
- `bounded(text)`: a value for the audit log or a log line. It is the text itself when that is
  storable and at most `MAX_CHARS` long; otherwise its first characters, cleaned, then `…sha256:`
  and the SHA-256 of the whole original, so that two different values never read alike and the
  original can still be matched against the entry.
- `bounded_json(value)`: the same for every string (keys too) of a JSON-like value, whose lists
  and objects keep at most `MAX_ITEMS` items.
- `escaped(text)`: for a line of text output, every control, format and line-separator
  character as a backslash escape, so that a value can never start a new line or a new field.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

MAX_CHARS = 256
MAX_ITEMS = 100
_HASHED = "…sha256:"
_REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> bool:
    """True if PostgreSQL can hold `text` as text or in jsonb: no NUL, no lone surrogate."""
    return "\x00" not in text if text.isascii() else _UNSTORABLE.search(text) is None


def _clean(text: str) -> str:
    return _UNSTORABLE.sub(_REPLACEMENT, text)


def bounded(text: str, limit: int = MAX_CHARS) -> str:
    """`text` if it is storable and at most `limit` characters, else a prefix of it and its hash (see above)."""
    if len(text) <= limit and storable(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    keep = max(0, limit - len(_HASHED) - len(digest))
    return _clean(text[:keep]) + _HASHED + digest


def bounded_json(value: Any, limit: int = MAX_CHARS) -> Any:
    """A JSON-like value with every string bounded and at most `MAX_ITEMS` items per list or object."""
    if isinstance(value, str):
        return bounded(value, limit)
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded(str(k), limit): bounded_json(v, limit) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"{len(items) - MAX_ITEMS} more"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [bounded_json(v, limit) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out_list.append(f"… {len(value) - MAX_ITEMS} more")
        return out_list
    return value


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Zl", "Zp"):
        return char
    code = ord(char)
    return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    )


def escaped(text: str) -> str:
    """`text` with backslashes, control, format and line-separator characters written as escapes."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)
