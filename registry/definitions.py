"""A tool's definition as approvals pin it: name, description, input schema and annotations;
and the other offerings pinned alike: prompts, resources, resource templates, server instructions.

The hash is over a canonical JSON form (sorted keys, no whitespace), so a pin holds
whatever order or spacing a server uses, and changes with any word or schema field.
Title and output schema are covered too: a title is what many clients show.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
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


# -- what else a server offers: prompts, resources, resource templates, its instructions --------
#
# A client puts these in front of the model too (a prompt's messages, a resource's text, the
# instructions of `initialize`), so approvals pin them like tools. Their pins share the approval's
# `pins` with the tools', under keys no tool name can take (MCP tool names have no colon):
# `prompt:<name>`, `resource:<uri>`, `template:<uriTemplate>`, `server:instructions`.


@dataclass(frozen=True)
class Kind:
    """One kind of listed offering besides tools."""

    listing: str
    """Its key in a server's catalog entry and in `registry_versions.offerings` ("prompts")."""
    pin: str
    """The prefix of its pin keys and of its drift rows ("prompt")."""
    ident: str
    """The field that names it ("name", "uri", "uriTemplate")."""
    fields: tuple[str, ...]
    """The fields a pin covers: what a client shows or hands to the model (not `size`, `_meta`, icons)."""


PROMPTS = Kind("prompts", "prompt", "name", ("name", "title", "description", "arguments"))
RESOURCES = Kind("resources", "resource", "uri", ("uri", "name", "title", "description", "mimeType"))
TEMPLATES = Kind("resourceTemplates", "template", "uriTemplate", ("uriTemplate", "name", "title", "description", "mimeType"))
KINDS = (PROMPTS, RESOURCES, TEMPLATES)
INSTRUCTIONS_PIN = "server:instructions"


def _sha256(document: Mapping[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def pin_key(kind: Kind, item: Mapping[str, Any]) -> str:
    return f"{kind.pin}:{item.get(kind.ident)}"


def offering_sha256(kind: Kind, item: Mapping[str, Any]) -> str:
    """The kind is hashed too, so no prompt hashes like a tool or a resource."""
    return _sha256({"kind": kind.pin, **{key: item[key] for key in kind.fields if item.get(key) is not None}})


def instructions_sha256(text: str) -> str:
    return _sha256({"kind": "instructions", "text": text})


def offering_pins(offerings: Mapping[str, Any]) -> dict[str, str]:
    """Pin key -> hash, for every prompt, resource and template recorded, and the instructions if any."""
    pins = {pin_key(kind, item): offering_sha256(kind, item) for kind in KINDS for item in offerings.get(kind.listing) or []}
    if offerings.get("instructions"):
        pins[INSTRUCTIONS_PIN] = instructions_sha256(offerings["instructions"])
    return pins


def tool_pin_count(pins: Mapping[str, str]) -> int:
    return sum(1 for key in pins if ":" not in key)
