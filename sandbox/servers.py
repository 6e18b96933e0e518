"""The MCP servers a sandbox runs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandbox.bundle import WORKSPACE
from sandbox.supervisor.config import ServerConfig

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    """The namespace of the server's tools (`<name>__<tool>`); lower-case, no `__`."""
    argv: tuple[str, ...]
    """As run inside the sandbox; `python` is the sandbox's Python with the product's packages importable."""
    env: Mapping[str, str] = field(default_factory=dict)
    revision: str = "builtin"
    """What of the server runs (a published wheel's digest): a sandbox whose server has another revision restarts it."""
    layer: str = ""
    """The digest of its dependency layer, a read-only dir beside its code in the tools dir (none: "")."""
    layer_wheels: tuple[str, ...] = ()
    """The digests of the wheels unpacked into that layer (a pod's init container fetches them)."""
    egress: tuple[str, ...] = ()
    """Hosts (`host`, `host:port`) its manifest declares: only these it can reach, through the egress proxy."""
    inference: bool = False
    """Its manifest declares `"inference": true`: it may ask the fleet's models, from its sandbox's model endpoint."""
    server: str = ""
    """Its name in the registry (`namespace/server`), under which its users' secrets are kept."""
    secret_names: tuple[str, ...] = ()
    """The secrets its manifest declares."""
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Their values for the sandbox's user, added to `env` when it runs; they reach a sandbox only over
    its channel (`configure`), never in the config file written at its start (`boot.prepare`)."""
    unavailable: str = ""
    """Why it cannot do its work (a declared secret is not set, Vault is down): its calls fail with this."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or "__" in self.name:
            raise ValueError(f"invalid server name {self.name!r}: use a-z, 0-9, '-' or '_' (no '__')")
        if not self.argv:
            raise ValueError(f"server {self.name!r} has an empty argv")
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "egress", tuple(self.egress))


BUILTIN_SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("workspace", ("python", "-m", "mcp_servers.workspace")),
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
    ServerSpec("conformance", ("python", "-m", "mcp_servers.conformance")),
)

FORK_SERVER_SETTING = "MCPFLEET_FORK_SERVER"


def fork_modules() -> list[str]:
    """The built-in servers' modules: in a sandbox, those servers are forked from one fork server that
    imported them and the `mcp` SDK once (`sandbox.supervisor.forks`). None when MCPFLEET_FORK_SERVER
    is 0: each is executed as a Python of its own, as before (the baseline of bench/sandbox_lifecycle.py)."""
    if os.environ.get(FORK_SERVER_SETTING, "1").lower() in ("0", "false", "no", "off"):
        return []
    return [s.argv[2] for s in BUILTIN_SERVERS if s.argv[:2] == ("python", "-m")]


START_SERVERS_SETTING = "MCPFLEET_START_SERVERS"


def start_servers() -> str:
    """When a sandbox's servers start: "first-use" (the default), each when the first message that
    needs it arrives (a call, a listing), so that an idle sandbox holds its supervisor alone; "boot",
    all of them with the supervisor, as before (the baseline of bench/sandbox_lifecycle.py)."""
    value = os.environ.get(START_SERVERS_SETTING, "first-use").strip().lower()
    if value not in ("boot", "first-use"):
        raise ValueError(f"{START_SERVERS_SETTING} must be boot or first-use, not {value!r}")
    return value


FIXTURE_SERVERS = frozenset({"conformance"})
"""Built-in servers that are test fixtures, not product: a tenant runs them only when enabled."""
PRODUCT_SERVERS: tuple[ServerSpec, ...] = tuple(s for s in BUILTIN_SERVERS if s.name not in FIXTURE_SERVERS)


class ServerSource(Protocol):
    """Which servers a user's sandbox runs (the registry decides, per user and over time)."""

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        """None: a warm-pool sandbox, which belongs to nobody yet."""
        ...

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        """Put what `servers` need into the sandbox's tools dir (and nothing else); runs in a thread."""
        ...


class StaticServers:
    """The same servers for everybody."""

    def __init__(self, servers: Sequence[ServerSpec]):
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique: {names}")
        self.servers = tuple(servers)

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        return self.servers

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        tools_dir.mkdir(mode=0o755, exist_ok=True)


def server_configs(servers: Sequence[ServerSpec]) -> list[ServerConfig]:
    """What the supervisor runs: each server in the workspace, where a tool's relative paths lead
    (the interpreter's flags keep the workspace off its import path: `PYTHON_FLAGS`). With their
    secrets: for the channel only."""
    return [
        ServerConfig(
            name=s.name, argv=list(s.argv), env={**s.env, **s.secrets}, cwd=WORKSPACE, revision=s.revision,
            egress=list(s.egress), inference=s.inference, unavailable=s.unavailable,
        )
        for s in servers
    ]


def without_secrets(servers: Sequence[ServerSpec]) -> tuple[ServerSpec, ...]:
    """The servers a sandbox may start with from its config file: those holding no secret. The
    others follow at once over the channel (the manager configures what differs from what runs)."""
    return tuple(s for s in servers if not s.secrets)
