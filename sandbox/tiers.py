"""Tiers: how much of the machine a user's sandbox may use, set by admins per user.

A tier's CPU, memory and pids limits hold from the sandbox's next start; its disk
quota is the size of the user's workspace image, grown (never shrunk) at the next
start as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from core.errors import FleetError
from sandbox.limits import Limits, MiB

DEFAULT_TIER = "standard"


class TierError(FleetError, ValueError):
    """A tier request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Tier:
    name: str
    cpus: float
    memory_mb: int
    pids: int
    disk_mb: int

    @property
    def limits(self) -> Limits:
        return Limits(memory_bytes=self.memory_mb * MiB, pids=self.pids, cpus=self.cpus)

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb * MiB

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Tier:
        return cls(row["name"], float(row["cpus"]), row["memory_mb"], row["pids"], row["disk_mb"])


@dataclass(frozen=True)
class Placement:
    """What the sandbox manager needs to know of a user before starting their sandbox."""

    tier: Tier
    tenant_max_running: int | None


_TIER_COLUMNS = "t.name, t.cpus, t.memory_mb, t.pids, t.disk_mb"


async def placement(conn: psycopg.AsyncConnection, user_id: int) -> Placement:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_TIER_COLUMNS}, n.max_running FROM users u JOIN tiers t ON t.name = u.tier"
            " JOIN tenants n ON n.id = u.tenant_id WHERE u.id = %s",
            (user_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise TierError(f"no user with id {user_id}")
    return Placement(Tier.from_row(row), row["max_running"])


async def get(conn: psycopg.AsyncConnection, name: str) -> Tier:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_TIER_COLUMNS} FROM tiers t WHERE t.name = %s", (name,))
        row = await cur.fetchone()
    if row is None:
        raise TierError(f"no tier named {name!r}")
    return Tier.from_row(row)


async def list_tiers(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    """Every tier with how many users it has."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_TIER_COLUMNS}, count(u.id) AS users FROM tiers t LEFT JOIN users u ON u.tier = t.name"
            " GROUP BY t.name ORDER BY t.name"
        )
        return await cur.fetchall()


async def put(conn: psycopg.AsyncConnection, tier: Tier) -> None:
    """Create the tier, or change its limits."""
    try:
        Limits(memory_bytes=tier.memory_mb * MiB, pids=tier.pids, cpus=tier.cpus)
    except ValueError as exc:
        raise TierError(str(exc)) from None
    if tier.disk_mb < 16:
        raise TierError("a workspace needs at least 16 MB of disk")
    try:
        await conn.execute(
            "INSERT INTO tiers (name, cpus, memory_mb, pids, disk_mb) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET cpus = EXCLUDED.cpus, memory_mb = EXCLUDED.memory_mb,"
            " pids = EXCLUDED.pids, disk_mb = EXCLUDED.disk_mb, updated_at = now()",
            (tier.name, tier.cpus, tier.memory_mb, tier.pids, tier.disk_mb),
        )
    except psycopg.errors.CheckViolation:
        raise TierError(f"invalid tier name {tier.name!r}: use a-z, 0-9, '.', '_' or '-'") from None


async def delete(conn: psycopg.AsyncConnection, name: str) -> None:
    if name == DEFAULT_TIER:
        raise TierError(f"the {DEFAULT_TIER!r} tier is every new user's and cannot be deleted")
    try:
        result = await conn.execute("DELETE FROM tiers WHERE name = %s", (name,))
    except psycopg.errors.ForeignKeyViolation:
        raise TierError(f"tier {name!r} still has users; move them to another tier first") from None
    if result.rowcount == 0:
        raise TierError(f"no tier named {name!r}")


async def assign(conn: psycopg.AsyncConnection, user_id: int, name: str) -> None:
    try:
        await conn.execute("UPDATE users SET tier = %s WHERE id = %s", (name, user_id))
    except psycopg.errors.ForeignKeyViolation:
        raise TierError(f"no tier named {name!r}") from None


async def cap_tenant(conn: psycopg.AsyncConnection, tenant: str, max_running: int | None) -> None:
    """At most `max_running` running sandboxes for the tenant's users at once (None: no cap)."""
    if max_running is not None and max_running < 0:
        raise TierError("--max-running must be 0 or more")
    result = await conn.execute("UPDATE tenants SET max_running = %s WHERE name = %s", (max_running, tenant))
    if result.rowcount == 0:
        raise TierError(f"no tenant named {tenant!r}")
