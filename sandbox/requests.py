"""Requests from the CLI (`mcpfleet sandboxes hibernate|resume|reclaim USER`) to the running gateway.

The gateway holds the sandboxes' channels, so it is the one that must act. The
CLI writes a row and sends NOTIFY; the gateway (woken by LISTEN, or by its
periodic sweep if the notification was missed) takes pending rows, acts, and
writes the outcome back, which the CLI waits for.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from core.errors import FleetError

CHANNEL = "sandbox_requests"
ACTIONS = ("hibernate", "resume", "reclaim")


@dataclass(frozen=True)
class Request:
    id: int
    user_id: int
    action: str
    requested_by: str


class RequestNotTaken(FleetError, RuntimeError):
    """No gateway took the request in time."""


async def submit(conn: psycopg.AsyncConnection, user_id: int, action: str, requested_by: str) -> int:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO sandbox_requests (user_id, action, requested_by) VALUES (%s, %s, %s) RETURNING id",
            (user_id, action, requested_by),
        )
        row = await cur.fetchone()
        await conn.execute(f"NOTIFY {CHANNEL}")
    assert row is not None
    return row[0]


async def take_pending(conn: psycopg.AsyncConnection) -> list[Request]:
    """Pending requests, oldest first, marked as picked (by this gateway alone, even with several)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "UPDATE sandbox_requests SET picked_at = now() WHERE id IN ("
            "  SELECT id FROM sandbox_requests WHERE done_at IS NULL AND picked_at IS NULL"
            "  ORDER BY requested_at FOR UPDATE SKIP LOCKED)"
            " RETURNING id, user_id, action, requested_by"
        )
        rows = await cur.fetchall()
    return sorted((Request(**r) for r in rows), key=lambda r: r.id)


async def finish(conn: psycopg.AsyncConnection, request_id: int, outcome: str, message: str | None = None) -> None:
    await conn.execute(
        "UPDATE sandbox_requests SET done_at = now(), outcome = %s, message = %s WHERE id = %s",
        (outcome, message, request_id),
    )


async def wait(
    conn: psycopg.AsyncConnection, request_id: int, *, timeout: float, pickup_timeout: float
) -> dict[str, Any]:
    """The finished request's row. Raises RequestNotTaken (and cancels the request) if no gateway
    picked it up within `pickup_timeout`, TimeoutError if it was not done within `timeout`."""
    started = time.monotonic()
    while True:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM sandbox_requests WHERE id = %s", (request_id,))
            row = await cur.fetchone()
        assert row is not None
        if row["done_at"] is not None:
            return row
        waited = time.monotonic() - started
        if row["picked_at"] is None and waited > pickup_timeout:
            cancelled = await conn.execute(
                "UPDATE sandbox_requests SET done_at = now(), outcome = 'cancelled',"
                " message = 'no gateway took it' WHERE id = %s AND picked_at IS NULL",
                (request_id,),
            )
            if cancelled.rowcount:
                raise RequestNotTaken(f"no gateway took the request within {pickup_timeout:.0f}s")
        if waited > timeout:
            raise TimeoutError(f"the gateway did not finish the request within {timeout:.0f}s")
        await asyncio.sleep(0.1)
