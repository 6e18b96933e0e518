"""Bringing a sandbox up from nothing: its dir, token, channel and the supervisor's config, then the
backend's start and the wait for the supervisor's hello.

The manager's cold start and the one-shot sandbox of a trial run (`sandbox.oneshot`) both come
up this way; they differ only in the workspace they mount and the code they put in `tools/`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sandbox import wire
from sandbox.backends.base import SandboxBackend, SandboxSpec
from sandbox.bundle import SERVER_UIDS
from sandbox.client import SupervisorClient
from sandbox.layout import SandboxLayout, make_channel, write_token
from sandbox.servers import ServerSpec, fork_modules, server_configs, without_secrets
from sandbox.supervisor.config import SupervisorConfig

START_BOOST_S = 10.0
"""How long a starting or resuming sandbox may use more CPU than its tier's share (`SandboxBackend.settle`):
enough for its servers' imports, and all that code which delays its readiness can gain by it."""


def prepare(
    layout: SandboxLayout,
    token: str,
    servers: Sequence[ServerSpec],
    *,
    mount_workspace: Callable[[Path], None],
    provision: Callable[[Path], None],
    uid: int,
    gid: int,
    traces: bool = False,
) -> None:
    """Everything the sandbox finds when it starts. Blocking (a workspace's mkfs and mount take a while).
    `traces`: the gateway exports traces, so the supervisor relays its servers' spans."""
    layout.dir.parent.mkdir(parents=True, exist_ok=True)
    layout.dir.mkdir(mode=0o711)
    # Outside the channel dir, so out of the sandbox's sight; a successor gateway reads it.
    write_token(layout, token)
    channel = make_channel(layout, uid, gid)
    mount_workspace(layout.workspace)
    provision(layout.tools)
    config = SupervisorConfig(
        socket=f"{wire.CHANNEL_DIR}/{wire.SOCKET_NAME}",
        # Written to disk: never a secret in it (those come over the channel, `configure`).
        servers=server_configs(without_secrets(servers)),
        token=token,
        server_uids=SERVER_UIDS,
        server_gid=gid,
        fork_modules=fork_modules(),
        traces=traces,
    )
    config.write(channel / wire.CONFIG_NAME, owner=(uid, gid))


async def boot(
    backend: SandboxBackend,
    spec: SandboxSpec,
    client: SupervisorClient,
    timeout: float,
    boost_s: float = START_BOOST_S,
) -> float:
    """Start the prepared sandbox and wait for its supervisor; returns the seconds that took.
    The client listens first: the supervisor connects as soon as it runs."""
    await client.listen()
    started = time.perf_counter()
    await backend.start(spec)
    await wait_ready(backend, client, spec.id, timeout, boost_s)
    return time.perf_counter() - started


async def wait_ready(
    backend: SandboxBackend, client: SupervisorClient, sandbox_id: str, timeout: float, boost_s: float = START_BOOST_S
) -> None:
    """Wait up to `timeout` for the supervisor's hello, then hold the sandbox to its CPU share; after
    `boost_s` it is held to it anyway, so a start kept from becoming ready gains no CPU by it."""
    ready = asyncio.ensure_future(client.wait_ready(timeout))
    try:
        await asyncio.wait({ready}, timeout=boost_s)
        if not ready.done():
            await backend.settle(sandbox_id)
        await ready
    finally:
        ready.cancel()
    await backend.settle(sandbox_id)
