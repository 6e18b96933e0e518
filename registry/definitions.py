"""A tool's definition as approvals pin it: name, description, input schema and annotations.

The hash is over a canonical JSON form (sorted keys, no whitespace), so a pin holds
whatever order or spacing a server uses, and changes with any word or schema field.
Title and output schema are covered too: a title is what many clients show.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


def pinned_part(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a tool definition a pin covers (absent fields stay absent)."""
    return {key: tool[key] for key in PINNED_FIELDS if tool.get(key) is not None}


def definition_sha256(tool: Mapping[str, Any]) -> str:
    canonical = json.dumps(pinned_part(tool), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pins_of(tools: list[Mapping[str, Any]]) -> dict[str, str]:
    """Tool's own name -> hash of its definition."""
    return {tool["name"]: definition_sha256(tool) for tool in tools}
