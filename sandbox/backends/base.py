"""What a sandbox backend does, whatever runs the sandboxes (runsc, Docker; Kubernetes next).

Every backend passes the one contract suite, tests/test_sandbox_backends.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from sandbox.limits import Limits


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to start one sandbox."""

    id: str
    directory: Path
    """The sandbox's own dir on the host: the backend keeps its files (bundle, logs) here."""
    workspace: Path
    """The user's workspace, mounted read-write at /workspace."""
    channel: Path
    """The channel dir, mounted at /run/mcpfleet: the supervisor's config and the gateway's socket."""
    limits: Limits
    uid: int
    gid: int


@dataclass(frozen=True)
class Container:
    id: str
    status: str
    """"running", "created", "paused" or "stopped"."""


class SandboxBackend(Protocol):
    name: str
    """Recorded with each sandbox in the database."""

    keeps_memory: bool
    """True if `checkpoint`/`restore` keep the sandbox's memory (processes, /tmp); False if a
    hibernated sandbox comes back as a fresh start on the same workspace."""

    async def start(self, spec: SandboxSpec) -> None:
        """Start the sandbox with the supervisor as its init; returns once it runs (detached)."""

    async def destroy(self, sandbox_id: str, *, grace: float = 0.0) -> None:
        """Stop the sandbox if it runs (asking nicely for up to `grace` seconds first) and free
        everything the backend holds for it. Idempotent."""

    async def settle(self, sandbox_id: str) -> None:
        """The sandbox's servers are up: hold it to its limits from now on.

        A backend may let a start use more CPU than the sandbox's share, since
        starting the servers is the slowest part of a cold start; the manager calls
        this once they are up, or after `START_BOOST_S` if they are not yet. Idempotent.
        """

    async def is_alive(self, sandbox_id: str) -> bool: ...

    async def list(self) -> list[Container]:
        """Every sandbox this backend knows of, running or not."""

    async def checkpoint(self, sandbox_id: str, image_dir: Path) -> None:
        """Save the sandbox to `image_dir` and stop it (hibernation). The supervisor has detached
        from its channel before this is called. Raises SandboxUnavailable if it could not be saved."""

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Run a sandbox saved by `checkpoint` again, under the same id and spec; returns once it
        runs (its supervisor then connects to the channel again)."""

    def kill_strays(self, keep: set[str]) -> int:
        """Kill what the backend runs for sandboxes other than `keep` and has no record of
        (left by a gateway that was killed mid-step); returns how many were killed."""

    async def memory_bytes(self, sandbox_id: str) -> int | None:
        """Host memory the sandbox holds now (resident set of its processes), if known."""


@runtime_checkable
class Freezing(Protocol):
    """A backend that can stop a running sandbox's processes in place and let them go on
    (`sandbox.backends.freezer`): the manager freezes sandboxes idle by calls and by CPU."""

    async def freeze(self, sandbox_id: str) -> bool:
        """True if its processes are stopped now (False: left running, e.g. no freezer here)."""

    def thaw(self, sandbox_id: str) -> None:
        """Let it go on; a no-op for a sandbox that is not frozen. Quick: called before every message."""

    def is_frozen(self, sandbox_id: str) -> bool: ...

    def thaw_all(self) -> list[str]:
        """Thaw every sandbox of the backend, whoever froze it (at a gateway's start); the ids thawed."""

    def cpu_seconds(self, sandbox_id: str) -> float | None:
        """CPU time its processes have used (None if unknown)."""


@runtime_checkable
class Cloning(Protocol):
    """A backend that can run a new sandbox from another one's checkpoint (`sandbox.templates`)."""

    async def clone(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Run a new sandbox under `spec` from the image `checkpoint` wrote of another: the same
        memory, with `spec`'s id, limits and mounts; returns once it runs."""
