"""What changed between a server's approved version and another: per tool (and per prompt, resource,
resource template and the instructions) added, removed, changed or same, and for a changed tool
which of its pinned fields differ. The registry API's version view and the admin console show these.
"""

from __future__ import annotations

from typing import Any

from registry.definitions import KINDS, PINNED_FIELDS, definition_sha256, instructions_sha256, offering_sha256


def changed_fields(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """The pinned fields (description, inputSchema, ...) whose values differ between two definitions of a tool."""
    if before is None or after is None:
        return []
    return [key for key in PINNED_FIELDS if before.get(key) != after.get(key)]


def diff_tools(before: list[dict[str, Any]] | None, after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tool: added, removed, changed or same, between the approved version and this one, and for a
    changed tool the fields that differ (`tool`, `change`, `fields`, `before`, `after`)."""
    old = {t["name"]: t for t in before or []}
    new = {t["name"]: t for t in after}
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        change = "added" if a is None else "removed" if b is None else "same" if definition_sha256(a) == definition_sha256(b) else "changed"
        out.append({"tool": name, "change": change, "fields": changed_fields(a, b) if change == "changed" else [],
                    "before": a, "after": b})
    return out


def diff_offerings(before: dict[str, Any] | None, after: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt, resource, resource template and the server's instructions: added, removed,
    changed or same, between the approved version and this one (`kind`, `name`, `change`, `before`,
    `after`, and for a changed one `fields`: those of its pinned fields that differ)."""
    out = []
    for kind in KINDS:
        old = {str(item.get(kind.ident)): item for item in (before or {}).get(kind.listing) or []}
        new = {str(item.get(kind.ident)): item for item in after.get(kind.listing) or []}
        for name in sorted(old.keys() | new.keys()):
            a, b = old.get(name), new.get(name)
            same = a is not None and b is not None and offering_sha256(kind, a) == offering_sha256(kind, b)
            change = "added" if a is None else "removed" if b is None else "same" if same else "changed"
            fields = [key for key in kind.fields if (a or {}).get(key) != (b or {}).get(key)] if change == "changed" else []
            out.append({"kind": kind.pin, "name": name, "change": change, "fields": fields, "before": a, "after": b})
    a, b = (before or {}).get("instructions"), after.get("instructions")
    if a or b:
        same = bool(a and b) and instructions_sha256(a) == instructions_sha256(b)
        change = "added" if not a else "removed" if not b else "same" if same else "changed"
        out.append({"kind": "instructions", "name": "instructions", "change": change,
                    "fields": ["description"] if change == "changed" else [], "before": {"description": a} if a else None, "after": {"description": b} if b else None})
    return out

