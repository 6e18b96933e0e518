"""The sandbox manager the gateway routes into, built from the fleet's settings."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from gateway.settings import Settings
from sandbox.limits import MiB, Limits
from sandbox.manager import SandboxManager
from sandbox.runsc_backend import RunscBackend
from sandbox.servers import BUILTIN_SERVERS


def sandbox_manager(settings: Settings, pool: AsyncConnectionPool) -> SandboxManager:
    limits = Limits(
        memory_bytes=settings.sandbox_memory_mb * MiB, pids=settings.sandbox_pids, cpus=settings.sandbox_cpus
    )
    # Every user gets the built-in servers until the registry decides per user.
    return SandboxManager(settings.home, pool, RunscBackend(settings.home / "runsc"), BUILTIN_SERVERS, limits)
