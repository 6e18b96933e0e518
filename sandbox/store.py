"""Sandbox rows in PostgreSQL (the `sandboxes` table of the fleet's schema).

Every state change is written before or as it happens, so a gateway that
restarts knows what the previous one left running.
"""

from __future__ import annotations

import enum
from typing import Any

import psycopg
from psycopg.rows import dict_row


class State(enum.StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    HIBERNATING = "Hibernating"
    HIBERNATED = "Hibernated"
    RESUMING = "Resuming"
    RECLAIMED = "Reclaimed"
    FAILED = "Failed"


ENDED = (State.RECLAIMED, State.FAILED)

# Warm-pool sandboxes have no user (and so no tenant) until they are claimed.
_COLUMNS = """
    s.id, s.user_id, u.name AS "user", t.name AS tenant, s.backend, s.state, s.reason, s.tier,
    s.created_at, s.updated_at, s.last_used_at, s.hibernated_at, s.checkpoint_bytes, s.claimed_at
"""
_FROM = "FROM sandboxes s LEFT JOIN users u ON u.id = s.user_id LEFT JOIN tenants t ON t.id = u.tenant_id"


async def insert(
    conn: psycopg.AsyncConnection, sandbox_id: str, user_id: int | None, backend: str, state: State, tier: str
) -> dict[str, Any]:
    """A new live row (`user_id` None: a warm-pool sandbox); raises psycopg.errors.UniqueViolation
    if the user already has a live sandbox."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "INSERT INTO sandboxes (id, user_id, backend, state, tier) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id, created_at, last_used_at",
            (sandbox_id, user_id, backend, state.value, tier),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def set_state(
    conn: psycopg.AsyncConnection,
    sandbox_id: str,
    state: State,
    reason: str | None = None,
    *,
    checkpoint_bytes: int | None = None,
) -> None:
    """Hibernated rows get their checkpoint's size and time; any other state clears them."""
    hibernated = state == State.HIBERNATED
    await conn.execute(
        "UPDATE sandboxes SET state = %s, reason = %s, updated_at = now(),"
        " hibernated_at = CASE WHEN %s THEN now() ELSE hibernated_at END,"
        " checkpoint_bytes = CASE WHEN %s THEN %s WHEN %s THEN checkpoint_bytes ELSE NULL END"
        " WHERE id = %s",
        (state.value, reason, hibernated, hibernated, checkpoint_bytes, state == State.RESUMING, sandbox_id),
    )


async def claim(conn: psycopg.AsyncConnection, sandbox_id: str, user_id: int) -> None:
    """A warm-pool sandbox becomes the user's; raises UniqueViolation if the user has a live one."""
    await conn.execute(
        "UPDATE sandboxes SET user_id = %s, claimed_at = now(), last_used_at = now(), updated_at = now()"
        " WHERE id = %s AND user_id IS NULL",
        (user_id, sandbox_id),
    )


async def live_sandbox_of(conn: psycopg.AsyncConnection, user_id: int) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} {_FROM} WHERE s.user_id = %s AND s.state <> ALL(%s)",
            (user_id, [s.value for s in ENDED]),
        )
        return await cur.fetchone()


async def touch(conn: psycopg.AsyncConnection, sandbox_ids: list[str]) -> None:
    await conn.execute("UPDATE sandboxes SET last_used_at = now() WHERE id = ANY(%s)", (sandbox_ids,))


async def live_sandboxes(conn: psycopg.AsyncConnection, backend: str) -> list[dict[str, Any]]:
    """Rows of one backend that are not Reclaimed or Failed, oldest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} {_FROM} WHERE s.backend = %s AND s.state <> ALL(%s) ORDER BY s.created_at",
            (backend, [s.value for s in ENDED]),
        )
        return await cur.fetchall()


async def list_sandboxes(conn: psycopg.AsyncConnection, *, include_ended: bool = False) -> list[dict[str, Any]]:
    """Sandboxes with their user and tenant names, newest first; live ones only unless `include_ended`."""
    where = "" if include_ended else "WHERE s.state <> ALL(%(ended)s)"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} {_FROM} {where} ORDER BY s.created_at DESC",
            {"ended": [s.value for s in ENDED]},
        )
        return await cur.fetchall()
