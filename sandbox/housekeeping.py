"""What the sandbox manager does on its own: hibernate idle sandboxes, reclaim long-unused ones,
keep the warm pool full, and carry out what the CLI asks (`sandbox.requests`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from core.tasks import Tasks
from sandbox import requests
from sandbox.errors import SandboxUnavailable
from sandbox.running import Sandbox
from sandbox.store import State

log = logging.getLogger(__name__)


class Managed(Protocol):
    """What housekeeping needs of the manager (`sandbox.manager.SandboxManager`): its public face."""

    pool: AsyncConnectionPool
    backend: Any
    lifecycle: Any

    async def ensure(self, user_id: int, tenant: str, user: str) -> Sandbox: ...
    async def hibernate(self, user_id: int, reason: str = ...) -> bool: ...
    async def reclaim(self, user_id: int, reason: str = ...) -> bool: ...
    def get(self, user_id: int) -> Sandbox | None: ...
    def idle_since(self, now: datetime, seconds: float) -> list[Sandbox]: ...
    async def flush_usage(self) -> None: ...
    def refill_pool(self) -> None: ...
    async def freeze_idle(self) -> list[str]: ...


class Housekeeper:
    def __init__(self, manager: Managed, database_url: str | None = None):
        """With `database_url`, CLI requests are taken at once (LISTEN); else at the next sweep."""
        self.manager = manager
        self.database_url = database_url
        self.desk = RequestDesk(manager.pool, manager)
        self._wake = asyncio.Event()
        self._tasks = Tasks()

    def start(self) -> None:
        self._tasks.spawn(self._sweep_periodically(), name="housekeeping")
        if self.database_url:
            self._tasks.spawn(self._listen(), name="sandbox-requests")

    async def stop(self) -> None:
        await self._tasks.close()

    async def _sweep_periodically(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.manager.lifecycle.housekeeping_interval_s)
            self._wake.clear()
            try:
                await self.sweep()
            except (psycopg.Error, OSError):
                log.exception("sandbox housekeeping failed; trying again at the next sweep")

    async def sweep(self) -> None:
        await self.take_requests()
        await self.hibernate_idle()
        await self.manager.freeze_idle()
        await self.reclaim_unused()
        self.manager.refill_pool()

    async def hibernate_idle(self) -> None:
        idle_s = self.manager.lifecycle.idle_hibernate_s
        if idle_s <= 0:
            return
        for sandbox in self.manager.idle_since(datetime.now(timezone.utc), idle_s):
            assert sandbox.user_id is not None
            try:
                await self.manager.hibernate(sandbox.user_id, f"no call for {idle_s:g} s")
            except SandboxUnavailable as exc:
                log.warning("could not hibernate idle sandbox %s: %s", sandbox.id, exc)

    async def reclaim_unused(self) -> None:
        after = self.manager.lifecycle.reclaim_after_s
        if after <= 0:
            return
        await self.manager.flush_usage()  # the rows must say when each was last used
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=after)
        async with self.manager.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT user_id FROM sandboxes WHERE backend = %s AND user_id IS NOT NULL"
                " AND state = ANY(%s) AND last_used_at < %s",
                (self.manager.backend.name, [State.RUNNING.value, State.HIBERNATED.value], cutoff),
            )
            user_ids = [r[0] for r in await cur.fetchall()]
        for user_id in user_ids:
            sandbox = self.manager.get(user_id)
            if sandbox is not None and sandbox.last_used_at >= cutoff:
                continue  # used since the row was last touched
            await self.manager.reclaim(user_id, f"unused for {after:g} s")

    async def take_requests(self) -> None:
        await self.desk.take()

    async def _listen(self) -> None:
        assert self.database_url is not None
        await listen_for_requests(self.database_url, self._wake)


class Acting(Protocol):
    """What carrying out the CLI's requests needs of a manager: either one (local or kubernetes)."""

    async def ensure(self, user_id: int, tenant: str, user: str) -> Any: ...
    async def hibernate(self, user_id: int, reason: str = ...) -> bool: ...
    async def reclaim(self, user_id: int, reason: str = ...) -> bool: ...


class RequestDesk:
    """The CLI's requests (`sandbox.requests`) carried out by a manager. The local manager's
    housekeeper takes them at every sweep; on kubernetes, where the operator does the rest of
    housekeeping, the gateway runs the desk alone (`start`)."""

    def __init__(self, pool: AsyncConnectionPool, manager: Acting, database_url: str | None = None, *, interval: float = 30.0):
        self.pool = pool
        self.manager = manager
        self.database_url = database_url
        self.interval = interval
        self._wake = asyncio.Event()
        self._tasks = Tasks()

    def start(self) -> None:
        self._tasks.spawn(self._take_periodically(), name="sandbox-requests")
        if self.database_url:
            self._tasks.spawn(listen_for_requests(self.database_url, self._wake), name="sandbox-requests-listen")

    async def close(self) -> None:
        await self._tasks.close()

    async def _take_periodically(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.take()
            except (psycopg.Error, OSError):
                log.exception("taking sandbox requests failed; trying again")

    async def take(self) -> None:
        async with self.pool.connection() as conn:
            pending = await requests.take_pending(conn)
        for request in pending:
            outcome, message = await self._carry_out(request)
            async with self.pool.connection() as conn:
                await requests.finish(conn, request.id, outcome, message)

    async def _carry_out(self, request: requests.Request) -> tuple[str, str | None]:
        by = f"requested by {request.requested_by}"
        try:
            if request.action == "hibernate":
                done = await self.manager.hibernate(request.user_id, by)
                return ("done", None) if done else ("nothing to do", "no running sandbox")
            if request.action == "reclaim":
                done = await self.manager.reclaim(request.user_id, f"reclaimed, {by}")
                return ("done", None) if done else ("nothing to do", "no sandbox")
            async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT u.name, t.name AS tenant FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = %s",
                    (request.user_id,),
                )
                user = await cur.fetchone()
            if user is None:
                return "failed", "no such user"
            sandbox = await self.manager.ensure(request.user_id, user["tenant"], user["name"])
            return "done", f"sandbox {sandbox.id} running"
        except SandboxUnavailable as exc:
            return "failed", str(exc)


async def listen_for_requests(database_url: str, wake: asyncio.Event) -> None:
    """Set `wake` on every request the CLI sends (NOTIFY), and once on (re)connecting."""
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {requests.CHANNEL}")
                wake.set()  # requests sent while nobody listened
                async for _ in conn.notifies():
                    wake.set()
        except psycopg.Error as exc:
            log.warning("lost the sandbox request listener (%s); reconnecting", exc)
            await asyncio.sleep(1.0)
