"""One gateway at a time manages the sandboxes of a backend in a database.

The local backends' manager assumes it is alone: at start it adopts every live row of its backend
(`sandbox.recovery`), removes what has none, and then starts, hibernates and reclaims as it sees
fit. Two managers on one database would adopt each other's sandboxes and start a user's twice. So
the manager runs only while its gateway holds a PostgreSQL advisory lock keyed by the backend, on a
connection of its own. A gateway that finds the lock taken is on standby (`LeasedManager`): it
passes `/mcp` on to the holder (gateway/forward.py; a call that still reaches its manager, with no
holder's address known, is refused saying which gateway runs the sandboxes), tries the lock
every few seconds, and when the holder is gone (stopped, killed: its session ends and the lock with
it) takes it and starts its manager, whose recovery adopts the sandboxes the other left running.

The lock lives as long as its connection: a restart of the database drops it, and the keeper takes
it again as soon as the database is back (if a standby took it first, the keeper says so loudly:
a standby that could reach the database while the holder could not).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

import psycopg

from core.tasks import Tasks
from sandbox.errors import SandboxUnavailable

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
APPLICATION = "mcpfleet sandbox manager"


class Standby(SandboxUnavailable):
    """This gateway does not run the sandboxes (yet): no fault of any sandbox's, so no breaker counts it."""


def node_key(backend: str) -> str:
    return f"mcpfleet sandboxes {backend}"


class NodeLease:
    def __init__(self, database_url: str, key: str, *, address: str = ""):
        self.database_url = database_url
        self.key = key
        self.address = address
        """Where the holder's gateway listens (shown to the others)."""
        self.held = False
        self._conn: psycopg.AsyncConnection | None = None

    async def try_acquire(self) -> bool:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True,
                application_name=f"{APPLICATION} pid {os.getpid()} {self.address}".strip()[:63])
        row = await (await self._conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.key,))).fetchone()
        self.held = bool(row and row[0])
        return self.held

    async def holder(self) -> str:
        """The holder's application name (its pid and address), as far as the database tells. In this
        database only: advisory locks are per database, and pg_locks shows every database's (another
        fleet's gateway on the same server must never be taken for this one's, nor sent its requests)."""
        try:
            assert self._conn is not None
            row = await (await self._conn.execute(
                """WITH k AS (SELECT hashtextextended(%s, 0) AS v)
                   SELECT a.application_name FROM k, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND l.classid = ((k.v >> 32) & 4294967295)::oid AND l.objid = (k.v & 4294967295)::oid""",
                (self.key,))).fetchone()
        except (psycopg.Error, AssertionError):
            return "another gateway"
        return str(row[0]) if row else "another gateway"

    async def release(self) -> None:
        if self._conn is not None:
            # Unlock before closing: a closed session's backend lets its locks go only as it exits, after
            # the client's close has returned, so a standby trying at once could still find the lock taken.
            if not self._conn.closed:
                try:
                    await self._conn.execute("SELECT pg_advisory_unlock_all()")
                except psycopg.Error:
                    pass  # the connection is gone already, and the lock with its session
            await self._conn.close()  # ends the session
        self._conn, self.held = None, False

    async def keep(self) -> None:
        """Hold the lock until cancelled: take it again after the database restarted."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                assert self._conn is not None
                await self._conn.execute("SELECT 1")
                continue
            except psycopg.Error:
                self.held = False
                log.warning("lost the database connection holding the sandbox lock; taking it again")
            while not self.held:
                try:
                    if not await self.try_acquire():
                        log.error("%s took the sandbox lock while the database was away: two managers now "
                                  "share these sandboxes; stop one", await self.holder())
                        return
                    log.info("took the sandbox lock again")
                except psycopg.Error:
                    await asyncio.sleep(1.0)


class Managing(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ensure(self, user_id: int, tenant: str, user: str) -> Any: ...
    def wake(self, user_id: int, tenant: str, user: str) -> None: ...
    async def hibernate(self, user_id: int, reason: str = ...) -> bool: ...
    async def reclaim(self, user_id: int, reason: str = ...) -> bool: ...


class LeasedManager:
    """`inner` (a sandbox manager) runs only while `lease` is held; until then it is on standby."""

    def __init__(self, inner: Managing, lease: NodeLease):
        self.inner = inner
        self.lease = lease
        self.active = False
        self._holder = "another gateway"
        self._tasks = Tasks()

    @property
    def owner_address(self) -> str | None:
        """None while this gateway runs the sandboxes; otherwise where the one that does listens."""
        if self.active:
            return None
        address = next((part for part in reversed(self._holder.split()) if ":" in part), None)
        if address is None:
            return None
        host, _, port = address.rpartition(":")
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{port}"

    def __getattr__(self, name: str) -> Any:  # what else the gateway reads (running, lifecycle): the inner's
        return getattr(self.inner, name)

    async def start(self) -> None:
        if await self.lease.try_acquire():
            await self._activate()
            return
        self._holder = await self.lease.holder()
        log.warning("%s runs the sandboxes: this gateway is on standby until it stops", self._holder)
        self._tasks.spawn(self._wait_for_lease(), name="sandbox-lease-wait")

    async def _activate(self) -> None:
        await self.inner.start()
        self.active = True
        self._tasks.spawn(self.lease.keep(), name="sandbox-lease")

    async def _wait_for_lease(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                if await self.lease.try_acquire():
                    log.info("took over the sandboxes from %s", self._holder)
                    await self._activate()
                    return
                self._holder = await self.lease.holder()
            except psycopg.Error as exc:
                log.warning("could not try the sandbox lock: %s", exc)

    async def close(self) -> None:
        await self._tasks.close()
        if self.active:
            await self.inner.close()
        await self.lease.release()

    def _standby(self) -> Standby:
        return Standby(f"this gateway is on standby: {self._holder} runs the sandboxes; call it, "
                                  "or again once this one has taken over")

    async def ensure(self, user_id: int, tenant: str, user: str) -> Any:
        if not self.active:
            raise self._standby()
        return await self.inner.ensure(user_id, tenant, user)

    def wake(self, user_id: int, tenant: str, user: str) -> None:
        """On standby there is nothing here to wake (the gateway that runs the sandboxes does it)."""
        if self.active:
            self.inner.wake(user_id, tenant, user)

    async def hibernate(self, user_id: int, reason: str = "requested") -> bool:
        if not self.active:
            raise self._standby()
        return await self.inner.hibernate(user_id, reason)

    async def reclaim(self, user_id: int, reason: str = "reclaimed") -> bool:
        if not self.active:
            raise self._standby()
        return await self.inner.reclaim(user_id, reason)
