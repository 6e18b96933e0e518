"""The MCP servers a sandbox runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    """The namespace of the server's tools (`<name>__<tool>`); lower-case, no `__`."""
    argv: tuple[str, ...]
    """As run inside the sandbox; `python` is the sandbox's Python with the product's packages importable."""
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or "__" in self.name:
            raise ValueError(f"invalid server name {self.name!r}: use a-z, 0-9, '-' or '_' (no '__')")
        if not self.argv:
            raise ValueError(f"server {self.name!r} has an empty argv")
        object.__setattr__(self, "argv", tuple(self.argv))


BUILTIN_SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("workspace", ("python", "-m", "mcp_servers.workspace")),
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
    ServerSpec("conformance", ("python", "-m", "mcp_servers.conformance")),
)
