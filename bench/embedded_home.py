"""Where the runsc benches run: a temporary home under /tmp (short: the channel's socket path must
stay within 107 bytes) with an embedded PostgreSQL of its own, removed at exit; and the sandbox
manager they measure in it."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox_lifecycle import tear_down  # beside this script

from core.db import migrate, open_pool, start_embedded
from sandbox.backends.runsc import RunscBackend
from sandbox.factory import sandbox_python
from sandbox.manager import Lifecycle, SandboxManager
from sandbox.servers import BUILTIN_SERVERS
from sandbox.steps import ImageSealer


def run_in_home(prefix: str, bench: Callable[[Path, str], Awaitable[None]], timeout: float) -> None:
    """`bench(home, database_url)`, given up after `timeout` seconds (a TimeoutError)."""
    if shutil.which("runsc") is None:
        raise SystemExit("runsc is not installed")
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    # Registered before the embedded PostgreSQL registers its own stop: exit handlers run last
    # registered first, so the server is down before its data dir goes.
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    url = start_embedded(home / "pg")
    migrate(url)
    asyncio.run(asyncio.wait_for(bench(home, url), timeout))


@contextlib.asynccontextmanager
async def home_manager(
    home: Path, url: str, name: str, tenant: str, *, clone_templates: bool = True, images: ImageSealer | None = None,
) -> AsyncIterator[tuple[SandboxManager, RunscBackend]]:
    """A manager of the built-in servers' sandboxes on real runsc in `home` (a runsc root and cgroup
    parent of its own, no warm pool, no housekeeping), with `tenant` created; not started (the bench
    starts it, and times that). Everything it ran is torn down after, on error too."""
    pool = await open_pool(url)
    cgroup_parent = f"/mcpfleet-{name}-{os.getpid()}"
    backend = RunscBackend(home / "runsc", cgroup_parent=cgroup_parent, python=sandbox_python())
    lifecycle = Lifecycle(warm_pool_size=0, housekeeping_interval_s=3600.0, clone_templates=clone_templates)
    manager = SandboxManager(home, pool, backend, BUILTIN_SERVERS, lifecycle=lifecycle, images=images)
    try:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO tenants (name) VALUES (%s) ON CONFLICT DO NOTHING", (tenant,))
        yield manager, backend
    finally:
        await tear_down(manager, backend, home, cgroup_parent, pool)
