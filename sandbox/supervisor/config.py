"""What the supervisor runs: written by the gateway into the channel dir, read inside."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path  # only where the gateway writes it: the supervisor does without pathlib's import

PROTOCOL_VERSION = "2025-11-25"
"""The MCP revision the supervisor offers its servers in the initialize handshake."""

CLIENT_CAPABILITIES: dict[str, Any] = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {}}
"""Offered to servers: the gateway relays these requests to the connected client."""

PYTHON_FLAGS = ("-s", "-P")
"""How the product's Python starts in a sandbox, so that nothing of the workspace is ever on its
import path: `-s`, no user site dir (HOME is /workspace: a `.pth` file or `usercustomize` under
~/.local would run at every start); `-P`, no working directory, script or `-c`/`-m` dir first on
sys.path (a planted /workspace/sandbox/ would replace the supervisor, a /workspace/mcp/ the SDK).
What remains on the path is read-only: PYTHONPATH as the bundle sets it, the stdlib, site-packages."""

SUPERVISOR_FLAGS = (*PYTHON_FLAGS, "-OO", "-S")
"""How the supervisor itself starts: as the product's Python, without docstrings and asserts (`-OO`:
about 1 MiB less of a fresh sandbox's own memory, bench/fresh_memory.py; its asserts only narrow
types), and without `site` (`-S`: it imports only the stdlib and its own package, which PYTHONPATH
names, so no .pth file of site-packages runs at its start). Its own .pyc files are compiled at both
levels (`bundle.compile_packages`); the fork server and the servers it starts are executed with
PYTHON_FLAGS alone (the SDK reads docstrings as tool descriptions, and they need site-packages)."""

_PYTHON = re.compile(r"^python(3(\.[0-9]+)?)?$")


def python_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with PYTHON_FLAGS after the program when it is a Python interpreter."""
    argv = list(argv)
    if argv and _PYTHON.match(os.path.basename(argv[0])):
        return [argv[0], *PYTHON_FLAGS, *argv[1:]]
    return argv


@dataclass(frozen=True)
class ServerConfig:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Its secrets among them (only when it comes over the channel, never in a file): not in its repr."""
    cwd: str | None = None
    revision: str = "builtin"
    egress: list[str] = field(default_factory=list)
    """Hosts (`host` or `host:port`) the manifest declares; non-empty: the server gets proxy credentials.
    The gateway checks each connection against its own copy; the supervisor only decides who gets credentials."""
    inference: bool = False
    """The manifest declares `"inference": true`: the server gets the model endpoint (`models`), with credentials of its own."""
    unavailable: str = ""
    """Why the server cannot do its work (a secret it declares is not set): its calls fail with this."""


@dataclass(frozen=True)
class SupervisorConfig:
    socket: str = ""
    """Path of the gateway's socket, as the supervisor sees it (unused when it listens on TCP)."""
    servers: list[ServerConfig] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Added to the supervisor's own environment for every server; a server's `env` comes on top."""
    protocol_version: str = PROTOCOL_VERSION
    client_capabilities: dict[str, Any] = field(default_factory=lambda: dict(CLIENT_CAPABILITIES))
    init_timeout: float = 60.0
    """Seconds a server has to answer `initialize`."""
    token: str = ""
    """Proves to the gateway that a connection comes from the supervisor and not from other code in the sandbox."""
    server_uids: int = 0
    """The first of the uids the servers run under, one uid each (`sandbox.supervisor.uids`), so that no
    server reads another's environment, memory or files nor signals it; 0: they run as the supervisor."""
    server_gid: int = 0
    """Their shared group, the workspace's: what one server writes there the others may change."""
    fork_modules: list[str] = field(default_factory=list)
    """Modules (`python -m MODULE`) whose servers are forked from one fork server that imported them
    and the `mcp` SDK once (`forks`), rather than each executed as a Python of its own; empty: none."""
    traces: bool = False
    """The gateway exports traces: serve the servers an OTLP endpoint and relay what they send (`traces`)."""
    start_servers: str = "boot"
    """"boot": every server starts with the supervisor; "first-use": a server starts when the first
    message that needs it arrives (`sandbox.servers.start_servers`), and the fork server with the first fork."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SupervisorConfig:
        raw = json.loads(text)
        servers = [ServerConfig(**s) for s in raw.pop("servers", [])]
        return cls(servers=servers, **raw)

    def write(self, path: Path, *, owner: tuple[int, int] | None = None) -> None:
        """Written 0600 (it carries the servers' environment) and atomically.

        The channel dir is the sandbox's to write, so no name in it is followed: the file is made
        new (a name taken, by a symlink or anything, is removed first) and chowned by descriptor;
        the rename replaces whatever holds `path` without following it.
        """
        tmp = path.with_name(path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str | Path) -> SupervisorConfig:
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def consume(cls, path: str | Path) -> SupervisorConfig:
        """Read and delete: the servers' environment (secrets) stays only in the supervisor's memory,
        out of reach of code run in the sandbox later and off the host's disk."""
        config = cls.read(path)
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # A pod's config comes on a read-only volume (no secrets in it: those come at `configure`).
        return config
