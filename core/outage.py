"""Riding out a database that is briefly unreachable.

What a request needs from PostgreSQL on its way to a running sandbox (who a key belongs to, the
tool set it is bound to) is read through an `OutageCache`: a value is trusted for `fresh_s`
seconds, then read again; when the database cannot be reached, a value read within the last
`outage_s` seconds keeps serving, and nothing older does. That is the bound on what an outage
lets through: a key revoked by a gateway that could still write the revocation stops working
here at the latest `outage_s` after this gateway last read it (sooner with the NOTIFY that
clears the cache as soon as its listener is back).

While the database is known to be down (a read failed in the last `RETRY_AFTER_S`), a cached
value serves without trying again, and when there is one to fall back on a read waits at most
`WAIT_S` (not the pool's 30 s): an outage does not add the pool's wait to the requests it spares.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg

from core.errors import FleetError

# A connection that fails, not a statement: the pool's timeout (`PoolTimeout`) is an OperationalError.
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
OUTAGE_S = 120.0
RETRY_AFTER_S = 2.0
WAIT_S = 1.0
_LIMIT = 10_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DatabaseUnavailable(FleetError):
    """What was asked needs the database, and it cannot be reached right now."""

    def __init__(self, what: str):
        super().__init__(f"{what} needs the database, which cannot be reached right now; try again in a moment")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    read_at: float
    fresh_until: float
    valid_until: float  # never served past this, outage or not (an expiring key's expiry)


class OutageCache(Generic[K, V]):
    def __init__(self, what: str, *, fresh_s: float, outage_s: float = OUTAGE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.fresh_s = fresh_s
        self.outage_s = outage_s
        self.clock = clock
        self.served_in_outage = 0
        """Values served because the database could not be reached (for the metrics)."""
        self._entries: dict[K, _Entry[V]] = {}
        self._down_until = 0.0

    def clear(self) -> None:
        self._entries.clear()

    async def get(self, key: K, load: Callable[[], Awaitable[tuple[V, float | None] | None]]) -> V | None:
        """The value of `key`: cached, or `load()`ed. `load` returns None for "no such thing" (not
        cached: what is made a moment later works at once), or the value and how many seconds at most
        it stays valid (None: no limit of its own). Raises `DatabaseUnavailable` when the database
        cannot be reached and nothing recent enough is cached."""
        now = self.clock()
        hit = self._entries.get(key)
        if hit is not None and now < hit.fresh_until:
            return hit.value
        usable = hit is not None and now - hit.read_at <= self.outage_s and now < hit.valid_until
        if usable and now < self._down_until:
            self.served_in_outage += 1
            return hit.value  # type: ignore[union-attr]
        try:
            if usable:
                async with asyncio.timeout(WAIT_S):
                    loaded = await load()
            else:
                loaded = await load()
        except (*UNREACHABLE, TimeoutError) as exc:
            self._down_until = self.clock() + RETRY_AFTER_S
            if usable:
                self.served_in_outage += 1
                return hit.value  # type: ignore[union-attr]
            raise DatabaseUnavailable(self.what) from exc
        if loaded is None:
            self._entries.pop(key, None)
            return None
        value, limit = loaded
        valid_until = now + limit if limit is not None else float("inf")
        if len(self._entries) >= _LIMIT:
            self._entries.clear()
        self._entries[key] = _Entry(value, now, min(now + self.fresh_s, valid_until), valid_until)
        return value
