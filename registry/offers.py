"""What of a running server's offer (tools, prompts, resources, instructions) an approval lets a user
see: what its grant allows and its pins match goes through; the rest is held back, each with the
sentence a refused call gets, and what drifted from its pin is handed back to be recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from registry.definitions import INSTRUCTIONS_PIN, KINDS, PROMPTS, definition_sha256, instructions_sha256, offering_sha256, pin_key
from registry.store import Approved


def guarded_offer(
    server: str, entry: Mapping[str, Any], grant: Approved
) -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str, dict[str, Any]]]]:
    """What of one server's offer the grant lets through, why the rest is held back (by the keys of
    `Registry.why_unavailable`), and what drifted: (pin key, live hash, live definition)."""
    reasons: dict[str, str] = {}
    drifted: list[tuple[str, str, dict[str, Any]]] = []
    whose = f"{grant.server} {grant.version}"
    until = "until an admin accepts the new one"
    tools = []
    for tool in entry.get("tools") or []:
        public = f"{server}__{tool['name']}"
        if grant.tools is not None and tool["name"] not in grant.tools:
            reasons[public] = f"{public} is not approved for you (the approval of {whose} allows only some of its tools)"
            continue
        live = definition_sha256(tool)
        if grant.allows(tool["name"], live):
            tools.append(tool)
        else:
            drifted.append((tool["name"], live, dict(tool)))
            reasons[public] = f"{public} is withheld: its definition differs from the one approved for {whose}, {until}"
    filtered: dict[str, Any] = {**entry, "tools": tools}
    for kind in KINDS:
        allowed = grant.prompts if kind is PROMPTS else grant.resources
        kept = []
        for item in entry.get(kind.listing) or []:
            ident = item.get(kind.ident)
            if not isinstance(ident, str):
                continue
            public = f"{server}__{ident}" if kind is PROMPTS else ident
            reason_key = f"prompt:{public}" if kind is PROMPTS else f"resource:{public}"
            if allowed is not None and ident not in allowed:
                reasons.setdefault(reason_key, f"{kind.pin} {public} is not approved for you (the approval of {whose} does not allow it)")
                continue
            key, live = pin_key(kind, item), offering_sha256(kind, item)
            if grant.allows(key, live):
                kept.append(item)
            else:
                drifted.append((key, live, dict(item)))
                reasons.setdefault(reason_key, f"{kind.pin} {public} is withheld: its definition differs from the one approved for {whose}, {until}")
        filtered[kind.listing] = kept
    # Instructions go on only as pinned (the gateway's own initialize does not pass any on today).
    instructions = entry.get("instructions")
    if instructions:
        live = instructions_sha256(instructions)
        if not grant.allows(INSTRUCTIONS_PIN, live):
            filtered["instructions"] = None
            drifted.append((INSTRUCTIONS_PIN, live, {"instructions": instructions}))
    return filtered, reasons, drifted
