"""Argument errors a user can act on: one line naming each argument and what is wrong with it.

Servers built on the Python SDK answer a call with bad arguments with pydantic's own text: several
lines per argument, the whole input echoed, and a documentation URL. The gateway rewrites that text
(recognised by its fixed layout) into one line, e.g.
`workspace__write_file: argument 'content' is missing; argument 'path' must be a valid string (got 3)`.
Any other error passes unchanged.
"""

from __future__ import annotations

import re
from typing import Any

_HEADER = re.compile(r"^Error executing tool (?P<tool>\S+): \d+ validation errors? for \S+$")
_ERROR = re.compile(
    r"^(?P<loc>\S[^\n]*)\n  (?P<msg>[^\n]+?) \[type=(?P<type>[\w.]+)(?:, input_value=(?P<value>.*?), input_type=\w+)?\]"
    r"(?:\n    For further information visit \S+)?$",
    re.MULTILINE,
)
SHOWN_VALUE = 40


def readable(result: dict[str, Any], public_name: str) -> dict[str, Any]:
    """`result` with a pydantic argument-validation text replaced by one line; otherwise unchanged."""
    content = result.get("content")
    if not result.get("isError") or not isinstance(content, list) or len(content) != 1:
        return result
    block = content[0]
    text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
    if not isinstance(text, str):
        return result
    header, _, rest = text.partition("\n")
    if not _HEADER.match(header):
        return result
    problems = [_problem(m) for m in _ERROR.finditer(rest)]
    if not problems:
        return result
    line = f"{public_name}: " + "; ".join(problems)
    return {**result, "content": [{**block, "text": line}]}


def _problem(match: re.Match[str]) -> str:
    where = ""
    for part in match["loc"].split("."):
        where += f"[{part}]" if part.isdigit() else (f".{part}" if where else part)
    if match["type"] == "missing":
        return f"argument '{where}' is missing"
    if match["type"] == "unexpected_keyword_argument" or match["type"] == "extra_forbidden":
        return f"argument '{where}' is not one this tool takes"
    why = match["msg"]
    why = why[0].lower() + why[1:]
    if why.startswith("input should "):
        why = "must " + why.removeprefix("input should ")
    value = match["value"]
    if value is not None and match["type"] != "missing":
        shown = value if len(value) <= SHOWN_VALUE else value[:SHOWN_VALUE] + "..."
        return f"argument '{where}' {why} (got {shown})"
    return f"argument '{where}' {why}"
