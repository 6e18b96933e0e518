"""What the `sandboxes` rows say, as the manager's steps happen.

A change of state is written before the step it announces, so whatever a crashed gateway left
behind, the next one can tell what to adopt, finish, roll back or clean up (`sandbox.recovery`);
the `on_transition` hook hears of it in the same transaction (the gateway audits every change).
When a sandbox was last used is stamped in memory on every call and written in batches: a row
update per call would cost more than the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sandbox import store
from sandbox.store import State

if TYPE_CHECKING:
    from sandbox.running import Sandbox

log = logging.getLogger(__name__)

REASON_CHARS = 200

Transition = Callable[[psycopg.AsyncConnection, dict[str, Any]], Awaitable[None]]
"""Told of every state change, in the transaction that records it (the gateway audits them)."""


class StateRecorder:
    def __init__(self, pool: AsyncConnectionPool, on_transition: Transition | None = None):
        self.pool = pool
        self.on_transition = on_transition

    async def insert(self, sandbox_id: str, user_id: int | None, backend: str, tier: str) -> dict[str, Any]:
        """The new sandbox's row, Pending. Raises psycopg's UniqueViolation if the user has a live one."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await store.insert(conn, sandbox_id, user_id, backend, State.PENDING, tier)
            await self._tell(conn, sandbox_id, State.PENDING, None, user_id)
        return row

    async def claim(self, sandbox_id: str, user_id: int) -> None:
        """A warm-pool sandbox is the user's from now on."""
        async with self.pool.connection() as conn, conn.transaction():
            await store.claim(conn, sandbox_id, user_id)
            await self._tell(conn, sandbox_id, State.RUNNING, "claimed from the warm pool", user_id)

    async def set(
        self,
        sandbox_id: str,
        state: State,
        reason: str | None = None,
        *,
        user_id: int | None = None,
        checkpoint_bytes: int | None = None,
    ) -> None:
        reason = short_reason(reason)
        async with self.pool.connection() as conn, conn.transaction():
            await store.set_state(conn, sandbox_id, state, reason, checkpoint_bytes=checkpoint_bytes)
            await self._tell(conn, sandbox_id, state, reason, user_id)

    async def _tell(
        self, conn: psycopg.AsyncConnection, sandbox_id: str, state: State, reason: str | None, user_id: int | None
    ) -> None:
        if self.on_transition is not None:
            await self.on_transition(
                conn, {"sandbox": sandbox_id, "state": state.value, "reason": reason, "user_id": user_id}
            )


def short_reason(reason: str | None) -> str | None:
    """What a row (and `sandboxes list`, and the audit log) says of a state: one line, a sentence long.
    Backends keep their tools' output for the log; this holds if an error brings some anyway."""
    if reason is None:
        return None
    line = reason.strip().splitlines()[0] if reason.strip() else ""
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 1] + "…"


class UsageStamps:
    """Every call touches its sandbox; the database hears of it every `interval` seconds."""

    def __init__(self, pool: AsyncConnectionPool, interval: float):
        self.pool = pool
        self.interval = interval
        self._touched: set[str] = set()

    def touch(self, sandbox: Sandbox) -> None:
        sandbox.last_used_at = datetime.now(timezone.utc)
        self._touched.add(sandbox.id)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox stopped or hibernated: its row says so, with the time of its last use."""
        self._touched.discard(sandbox_id)

    async def flush(self) -> None:
        if not self._touched:
            return
        ids, self._touched = sorted(self._touched), set()
        async with self.pool.connection() as conn:
            await store.touch(conn, ids)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except psycopg.Error:
                log.exception("could not record when sandboxes were last used")
