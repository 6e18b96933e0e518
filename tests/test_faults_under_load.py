"""Faults under a small concurrent load through `mcpfleet up --replicas 2` (issue: faults survived under
load), each with its promised outcome. The fleet of bench/load_faults.py, shortened: a few clients of
three users doing mixed workspace calls for a few seconds, an embedded PostgreSQL of its own (it is
restarted) and a redis-server of its own (it is stopped), all on loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable

import pytest

from bench.fleet_faults import (
    SETTINGS,
    Fleet,
    Postgres,
    Redis,
    add_users,
    audit_missing,
    free_port,
    kill_sandboxes,
    read_back,
    sandbox_ids,
    warm_up,
)
from bench.load_traffic import Call, Record, first_errors, load

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is needed (scripts/setup.sh test installs it)")

CLIENTS = 6  # two per user
LOAD_S = 8.0
FAULT_AT_S = 2.0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    redis = Redis(work)
    redis.start()
    fleet = pg = None
    try:
        pg = Postgres(work / "pg")
        env = {**os.environ, **SETTINGS, "MCPFLEET_HOME": str(work / "fleet"), "MCPFLEET_PORT": str(free_port()),
               "DATABASE_URL": pg.url, "REDIS_URL": redis.url, "MCPFLEET_WARM_POOL_SIZE": "0"}
        fleet = Fleet(work / "fleet", env, 2)
        fleet.up(timeout=600)  # generous: the suite runs on loaded machines
        keys = add_users(fleet, 3)
        asyncio.run(warm_up(fleet, keys))
        yield fleet, pg, redis, keys
    finally:
        if fleet is not None:
            fleet.stop()
        if pg is not None and pg.running():
            pg.stop()  # its own server, not the suite's: it would outlive the run
        redis.stop()


async def under_load(fleet: Fleet, keys: dict[str, str], run: str, fault: Callable[[], None],
                     seconds: float = LOAD_S) -> tuple[Record, float, float]:
    """The load for `seconds` with `fault` run (in a thread) FAULT_AT_S into it; returns what the
    clients saw and when the fault began and ended."""
    record = Record()

    async def strike() -> tuple[float, float]:
        await asyncio.sleep(FAULT_AT_S)
        began = time.monotonic()
        await asyncio.to_thread(fault)
        return began, time.monotonic()

    _, (began, ended) = await asyncio.gather(load(fleet.url, keys, CLIENTS, seconds, record, run), strike())
    return record, began, ended


def answered_during(calls: list[Call], began: float, ended: float) -> list[Call]:
    return [c for c in calls if c.ok and began <= c.started and c.ended <= ended]


def assert_nothing_lost(fleet: Fleet, record: Record) -> None:
    missing = audit_missing(fleet, record, timeout=120)
    assert not missing, f"answered calls with no audit entry: {dict(missing)}"
    verify = fleet.cli("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_redis_stopped_limits_fall_back_per_replica_and_calls_are_answered(loaded):
    fleet, _, redis, keys = loaded

    def stop_redis() -> None:
        redis.stop()
        time.sleep(3)
        redis.start()

    record, began, ended = await under_load(fleet, keys, "redis", stop_redis)
    assert answered_during(record.calls, began, ended), f"no call answered while Redis was down: {first_errors(record.calls)}"
    assert any(c.ok for c in record.calls if c.started > ended)
    assert_nothing_lost(fleet, record)


async def test_a_sandbox_killed_mid_load_costs_only_its_users_calls_and_keeps_their_files(loaded):
    fleet, _, _, keys = loaded
    victim = sorted(keys)[0]
    ids = sandbox_ids(fleet, victim)
    assert ids

    # Longer: the manager notices the death and starts a new sandbox, seconds on a loaded machine.
    record, began, _ = await under_load(fleet, keys, "sandbox", lambda: kill_sandboxes(fleet, ids), seconds=20)
    others = [c for c in record.calls if c.user != victim]
    assert others and all(c.ok for c in others), first_errors(others)
    theirs = [c for c in record.calls if c.user == victim]
    failed = [c for c in theirs if not c.ok]
    # Clear errors, not hangs: a JSON-RPC error or an isError result naming what went wrong.
    assert all(c.error.startswith(("JSON-RPC error", "isError", "HTTP 503")) for c in failed), first_errors(failed)
    last_failure = max((c.started for c in failed), default=began)
    assert any(c.ok and c.started > last_failure for c in theirs), f"{victim}'s calls did not recover: {first_errors(theirs)}"
    # The workspace outlives the sandbox: every file a successful write wrote, before or after, reads back.
    lost = await read_back(fleet, keys, record.written)
    assert not lost, lost[:5]
    assert_nothing_lost(fleet, record)


async def test_postgres_restarted_calls_keep_being_answered_and_no_audit_entry_is_lost(loaded):
    fleet, pg, _, keys = loaded

    def restart() -> None:
        pg.stop()
        time.sleep(3)
        pg.start()

    record, began, ended = await under_load(fleet, keys, "postgres", restart)
    assert answered_during(record.calls, began, ended), f"no call answered while PostgreSQL was down: {first_errors(record.calls)}"
    assert any(c.ok for c in record.calls if c.started > ended)
    assert_nothing_lost(fleet, record)


async def test_the_lease_holder_killed_the_other_replica_takes_over_and_no_audit_entry_is_lost(loaded):
    fleet, _, _, keys = loaded
    holder = fleet.holder()
    assert holder is not None

    # Longer: a standby takes the lease within seconds, more on a loaded machine.
    record, _, ended = await under_load(fleet, keys, "holder", lambda: holder.send_signal(signal.SIGKILL), seconds=20)
    deadline = time.monotonic() + 120
    while (now := fleet.holder()) is None or now.pid == holder.pid:
        assert time.monotonic() < deadline, "no replica took the lease"
        time.sleep(0.5)
    assert any(c.ok for c in record.calls if c.started > ended), first_errors(record.calls)
    # The killed holder's last answered calls are in its journal only: the replica that took the lease
    # (or the one started in its place) replays them.
    assert_nothing_lost(fleet, record)
