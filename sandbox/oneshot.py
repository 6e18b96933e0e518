"""One sandbox for one job, then gone: a trial run of a published version, `mcpfleet dev`.

It comes up as the manager's sandboxes do (`sandbox.boot`), with no row and no user: its
workspace is an empty tmpfs of the given size, as its channel is a tiny one, so the code in it
writes nothing to the host's disk, and all of it is removed when the block ends.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox import tmpfs
from sandbox.backends.base import SandboxBackend, SandboxSpec
from sandbox.boot import boot, prepare
from sandbox.client import SupervisorClient
from sandbox.layout import SandboxLayout, drop_channel
from sandbox.limits import Limits
from sandbox.servers import ServerSpec

ONESHOT_INODES = 16384
"""Files its workspace may hold: plenty for a server's scratch files, few enough to bound tmpfs metadata."""


@dataclass(frozen=True)
class OneShot:
    id: str
    client: SupervisorClient
    start_s: float
    """From the backend's start to the supervisor's hello."""


@asynccontextmanager
async def one_shot(
    backend: SandboxBackend,
    home: Path,
    servers: Sequence[ServerSpec],
    tools: dict[str, Path],
    *,
    limits: Limits,
    workspace_bytes: int,
    uid: int,
    gid: int,
    timeout: float = 120.0,
) -> AsyncIterator[OneShot]:
    """A running sandbox with `servers`, whose code is `tools` (name in tools/ -> a dir copied there).
    Raises SandboxUnavailable or OSError if it did not start (having removed what it got to)."""
    layout = SandboxLayout(home, f"trial-{secrets.token_hex(6)}")
    token = secrets.token_urlsafe(32)
    client = SupervisorClient(layout.socket, token=token, socket_owner=(uid, gid))
    spec = SandboxSpec(layout.sandbox_id, layout.dir, layout.workspace, layout.channel, limits, uid, gid)

    def mount_workspace(workspace: Path) -> None:
        tmpfs.mount(workspace, size_bytes=workspace_bytes, inodes=ONESHOT_INODES, uid=uid, gid=gid)

    def provision(directory: Path) -> None:
        directory.mkdir(mode=0o755)
        for name, source in tools.items():
            shutil.copytree(source, directory / name, symlinks=True)

    started = False
    try:
        await asyncio.to_thread(
            prepare, layout, token, servers, mount_workspace=mount_workspace, provision=provision, uid=uid, gid=gid
        )
        started = True
        took = await boot(backend, spec, client, timeout)
        yield OneShot(layout.sandbox_id, client, took)
    finally:
        await client.close()
        if started:
            await backend.destroy(layout.sandbox_id)
        await asyncio.to_thread(_remove, layout)


def _remove(layout: SandboxLayout) -> None:
    tmpfs.unmount(layout.workspace)
    drop_channel(layout)
    shutil.rmtree(layout.dir, ignore_errors=True)
