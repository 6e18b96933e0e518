"""What a tool server may import from mcpfleet: its secrets, and its project's fleet metadata.

Tool servers are plain `mcp` servers; nothing here is needed to write one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mcpfleet_sdk.secrets import SecretError, secret

if TYPE_CHECKING:
    from registry.manifest import FleetMeta, Manifest


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
