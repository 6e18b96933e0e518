"""What `core.outage.OutageCache` serves while the database cannot be reached, and the bound on it.

The loader here raises psycopg's `OperationalError` as a pool does when the server is gone; the
gateway's side of the same thing, against a real PostgreSQL stopped and restarted, is in
tests/test_database_outage.py. A settable clock stands in for time passing."""

from __future__ import annotations

import psycopg
import pytest

from core.outage import RETRY_AFTER_S, DatabaseUnavailable, OutageCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Database:
    """What the loader reads: a value, or nothing (revoked), or a failure to connect."""

    def __init__(self) -> None:
        self.value: str | None = "alice"
        self.down = False
        self.reads = 0
        self.limit: float | None = None

    async def load(self) -> tuple[str, float | None] | None:
        self.reads += 1
        if self.down:
            raise psycopg.OperationalError("connection refused")
        return None if self.value is None else (self.value, self.limit)


@pytest.fixture
def parts() -> tuple[Clock, Database, OutageCache[str, str]]:
    clock = Clock()
    return clock, Database(), OutageCache("Checking this key", fresh_s=30, outage_s=120, clock=clock)


async def test_fresh_values_are_not_read_again_and_stale_ones_are(parts):
    clock, db, cache = parts
    assert await cache.get("k", db.load) == "alice"
    clock.now += 29
    assert await cache.get("k", db.load) == "alice" and db.reads == 1
    clock.now += 2
    db.value = None  # revoked while the database is up: refused at the next read
    assert await cache.get("k", db.load) is None and db.reads == 2


async def test_an_outage_serves_values_read_within_the_bound_and_no_older(parts):
    clock, db, cache = parts
    await cache.get("k", db.load)
    db.down = True
    clock.now += 60
    assert await cache.get("k", db.load) == "alice"
    assert cache.served_in_outage == 1
    clock.now += 59  # 119 s after the read
    assert await cache.get("k", db.load) == "alice"
    clock.now += 2  # 121 s: past the bound, refused with a clear error
    with pytest.raises(DatabaseUnavailable, match="needs the database"):
        await cache.get("k", db.load)


async def test_a_key_never_read_is_not_let_in_by_an_outage(parts):
    _, db, cache = parts
    db.down = True
    with pytest.raises(DatabaseUnavailable):
        await cache.get("new", db.load)


async def test_while_known_down_the_database_is_not_asked_on_every_request(parts):
    clock, db, cache = parts
    await cache.get("k", db.load)
    clock.now += 31
    db.down = True
    await cache.get("k", db.load)
    reads = db.reads
    for _ in range(5):
        assert await cache.get("k", db.load) == "alice"
    assert db.reads == reads  # within RETRY_AFTER_S of the failure: served without a try
    clock.now += RETRY_AFTER_S + 0.1
    await cache.get("k", db.load)
    assert db.reads == reads + 1
    db.down = False
    clock.now += RETRY_AFTER_S + 0.1
    assert await cache.get("k", db.load) == "alice" and db.reads == reads + 2


async def test_an_expiring_value_is_never_served_past_its_expiry(parts):
    clock, db, cache = parts
    db.limit = 10.0
    await cache.get("k", db.load)
    db.down = True
    clock.now += 9
    assert await cache.get("k", db.load) == "alice"
    clock.now += 2
    with pytest.raises(DatabaseUnavailable):
        await cache.get("k", db.load)


async def test_a_statement_error_is_not_taken_for_an_outage(parts):
    clock, db, cache = parts
    await cache.get("k", db.load)
    clock.now += 31

    async def broken() -> None:
        raise psycopg.errors.UndefinedTable("no such table")

    with pytest.raises(psycopg.errors.UndefinedTable):
        await cache.get("k", broken)
