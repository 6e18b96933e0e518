"""What a tool server may import from mcpfleet: its secrets, and its project's fleet metadata.

Tool servers are plain `mcp` servers; nothing here is needed to write one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcpfleet_sdk.secrets import SecretError, secret
    from registry.manifest import FleetMeta, Manifest


def __getattr__(name: str) -> object:
    # `secret` and `SecretError` need the mcp SDK (a secret's error is a ToolError), which takes most
    # of a second to import: loaded when a tool server asks for them, never by the CLI's own commands.
    if name in ("secret", "SecretError"):
        from mcpfleet_sdk import secrets

        return getattr(secrets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manifest(project: str | Path | None = None) -> Manifest:
    """The manifest of `project` (default: `MCPFLEET_PROJECT`, else the nearest directory with a server.json
    from the current one upwards). For tests and tooling on the developer's machine."""
    from mcpfleet_sdk import project as projects

    directory = Path(project).resolve() if project is not None else projects.require_project()
    return projects.load(directory)


def declared(project: str | Path | None = None) -> FleetMeta:
    """What the project asks of the fleet (`_meta["io.mcpfleet"]`): egress hosts, secret names, memory_mb, cpus."""
    return manifest(project).fleet


__all__ = ["SecretError", "declared", "manifest", "secret"]
