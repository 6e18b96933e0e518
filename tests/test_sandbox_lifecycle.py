"""The sandbox lifecycle against real runsc: hibernate with memory, resume on the next call,
reclaim, the warm pool, tiers and caps, and what a restarted gateway makes of every state.

Each manager here has a home (and runsc root and cgroup) of its own, since a starting
manager adopts or destroys whatever it finds in its home.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.accounts import add_user
from sandbox import requests, store, tiers
from sandbox.backends.runsc import RunscBackend
from sandbox.errors import QuotaExceeded
from sandbox.manager import Lifecycle, Sandbox, SandboxManager
from sandbox.servers import ServerSpec
from sandbox.store import State
from sandbox.tiers import Tier
from tests.test_sandbox_backends import workspace_of
from tests.test_sandbox_supervisor import FIXTURE_SERVER, payload, text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

SERVERS = [
    ServerSpec("fixture", ("python", "-c", FIXTURE_SERVER)),
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
]


class Fleet:
    """Managers over one home, as successive gateways would be."""

    def __init__(self, pool, name: str, **lifecycle):
        self.pool = pool
        self.tenant = f"{name}-{os.getpid()}"
        # Short: the gateway's socket lives under it and Unix socket paths stop at 107 bytes.
        self.home = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
        self.backend = RunscBackend(self.home / "runsc", cgroup_parent=f"/mcpfleet-test-{name}")
        self.lifecycle = Lifecycle(**{"housekeeping_interval_s": 3600.0, **lifecycle})
        self.managers: list[SandboxManager] = []

    async def manager(self, servers=SERVERS) -> SandboxManager:
        manager = SandboxManager(self.home, self.pool, self.backend, servers, lifecycle=self.lifecycle)
        await manager.start()
        self.managers.append(manager)
        return manager

    async def user(self, name: str, tier: str | None = None) -> tuple[int, str, str]:
        async with self.pool.connection() as conn:
            user_id = (await add_user(conn, name, tenant=self.tenant)).user_id
            if tier is not None:
                await tiers.assign(conn, user_id, tier)
        return user_id, self.tenant, name

    async def close(self) -> None:
        for manager in self.managers:
            with contextlib.suppress(Exception):
                await manager.close()
        for container in await self.backend.list():
            await self.backend.destroy(container.id)
        if self.managers:
            self.managers[-1].workspaces.cleanup(self.home, keep=set())
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
async def fleets(db_pool) -> AsyncIterator:
    made: list[Fleet] = []

    async def make(name: str, **lifecycle) -> Fleet:
        fleet = Fleet(db_pool, name, **lifecycle)
        async with db_pool.connection() as conn:
            await conn.execute("INSERT INTO tenants (name) VALUES (%s) ON CONFLICT DO NOTHING", (fleet.tenant,))
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


async def call(sandbox: Sandbox, tool: str, server: str = "fixture", **arguments) -> dict:
    return await sandbox.client.request(server, "tools/call", {"name": tool, "arguments": arguments}, timeout=60)


async def sh(sandbox: Sandbox, command: str, **options) -> dict:
    result = await call(sandbox, "run", server="exec", command=command, **options)
    assert "structuredContent" in result, result
    return result["structuredContent"]


async def row_of(pool, sandbox_id: str) -> dict:
    async with pool.connection() as conn:
        [row] = [r for r in await store.list_sandboxes(conn, include_ended=True) if r["id"] == sandbox_id]
    return row


def sandbox_processes(backend: RunscBackend, sandbox_id: str) -> list[int]:
    return backend.host_processes(sandbox_id)


# -- hibernation keeps memory; a call wakes the sandbox -----------------------------------------


async def test_hibernate_keeps_memory_and_background_processes_and_a_call_resumes(fleets):
    fleet = await fleets("mem")
    manager = await fleet.manager()
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    first = int(text(await call(sandbox, "counter")))
    await sh(sandbox, "echo in-memory > /tmp/note")
    ticker = await sh(sandbox, "i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.2; done", background=True)
    await sh(sandbox, "sleep 1000 &")  # a command ending in & keeps running too
    await call(sandbox, "write_file", path="/workspace/on-disk.txt", text="kept")
    await asyncio.sleep(0.5)

    started = time.perf_counter()
    assert await manager.hibernate(alice[0]) is True
    hibernate_s = time.perf_counter() - started
    row = await row_of(fleet.pool, sandbox.id)
    assert row["state"] == "Hibernated" and row["checkpoint_bytes"] > 1_000_000 and row["hibernated_at"]
    assert sandbox_processes(fleet.backend, sandbox.id) == []  # nothing runs while it sleeps
    assert manager.workspaces.mounted(str(alice[0])) is None
    assert (sandbox.directory / "checkpoint").is_dir()
    assert await manager.hibernate(alice[0]) is False  # already hibernated: nothing to do

    started = time.perf_counter()
    resumed = await manager.ensure(*alice)
    resume_s = time.perf_counter() - started
    print(f"\nhibernate {hibernate_s:.2f} s ({row['checkpoint_bytes'] / 2**20:.0f} MiB), resume {resume_s:.2f} s")
    assert resumed.id == sandbox.id
    assert int(text(await call(resumed, "counter"))) == first + 1  # the same server process, memory and all
    assert (await sh(resumed, "cat /tmp/note"))["stdout"] == "in-memory\n"
    ps = (await sh(resumed, f"kill -0 {ticker['background_pid']} && echo alive; pgrep -f 'sleep 1000' >/dev/null && echo sleeper"))
    assert ps["stdout"] == "alive\nsleeper\n", ps
    before = int((await sh(resumed, "cat /tmp/ticks"))["stdout"])
    await asyncio.sleep(1.0)
    assert int((await sh(resumed, "cat /tmp/ticks"))["stdout"]) > before  # still ticking after the resume
    assert "kept" in text(await call(resumed, "read_file", path="/workspace/on-disk.txt"))
    assert not (sandbox.directory / "checkpoint").exists()  # a resumed sandbox's image is dropped
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Running"


async def test_racing_calls_on_a_hibernated_sandbox_resume_it_once(fleets):
    fleet = await fleets("race")
    manager = await fleet.manager()
    bob = await fleet.user("bob")
    sandbox = await manager.ensure(*bob)
    await manager.hibernate(bob[0])
    results = await asyncio.gather(*(manager.ensure(*bob) for _ in range(6)))
    assert {s.id for s in results} == {sandbox.id}
    async with fleet.pool.connection() as conn:
        live = [r for r in await store.list_sandboxes(conn) if r["user_id"] == bob[0]]
    assert [r["state"] for r in live] == ["Running"]


async def test_hibernation_waits_for_calls_in_flight(fleets):
    fleet = await fleets("drain")
    manager = await fleet.manager()
    carol = await fleet.user("carol")
    sandbox = await manager.ensure(*carol)
    slow = asyncio.create_task(call(sandbox, "slow", seconds=1.5))
    await asyncio.sleep(0.3)
    assert await manager.hibernate(carol[0]) is True
    assert text(await slow) == "done"  # the call finished before the checkpoint
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Hibernated"


async def test_idle_sandboxes_hibernate_and_long_unused_ones_are_reclaimed(fleets):
    fleet = await fleets("idle", idle_hibernate_s=1.0, reclaim_after_s=3600.0, housekeeping_interval_s=0.5)
    manager = await fleet.manager()
    dave = await fleet.user("dave")
    sandbox = await manager.ensure(*dave)
    await call(sandbox, "write_file", path="/workspace/keep.txt", text="kept")
    deadline = time.monotonic() + 30
    while (await row_of(fleet.pool, sandbox.id))["state"] != "Hibernated" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    row = await row_of(fleet.pool, sandbox.id)
    assert row["state"] == "Hibernated" and "no call for 1 s" in row["reason"]

    # Unused for longer than reclaim_after: gone, checkpoint and all; the workspace stays (retention: keep).
    async with fleet.pool.connection() as conn:
        await conn.execute("UPDATE sandboxes SET last_used_at = now() - interval '2 hours' WHERE id = %s", (sandbox.id,))
    await manager.housekeeper.reclaim_unused()
    row = await row_of(fleet.pool, sandbox.id)
    assert row["state"] == "Reclaimed" and "unused" in row["reason"]
    assert not sandbox.directory.exists()
    with workspace_of(manager, dave[0]) as workspace:
        assert (workspace / "keep.txt").read_text() == "kept"
    fresh = await manager.ensure(*dave)  # the next call starts a fresh sandbox on the same workspace
    assert fresh.id != sandbox.id
    assert "kept" in text(await call(fresh, "read_file", path="/workspace/keep.txt"))


async def test_reclaim_with_retention_delete_drops_the_workspace(fleets):
    fleet = await fleets("retain", delete_workspace_on_reclaim=True)
    manager = await fleet.manager()
    erin = await fleet.user("erin")
    sandbox = await manager.ensure(*erin)
    await manager.hibernate(erin[0])
    assert await manager.reclaim(erin[0]) is True
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Reclaimed"
    assert not manager.workspaces.exists(str(erin[0]))
    assert await manager.reclaim(erin[0]) is False


async def test_cli_requests_are_carried_out_by_the_manager(fleets):
    fleet = await fleets("cli")
    manager = await fleet.manager()
    fred = await fleet.user("fred")
    sandbox = await manager.ensure(*fred)
    async with fleet.pool.connection() as conn:
        hibernate = await requests.submit(conn, fred[0], "hibernate", "test")
        resume = await requests.submit(conn, fred[0], "resume", "test")
        again = await requests.submit(conn, fred[0], "resume", "test")
    await manager.housekeeper.take_requests()
    async with fleet.pool.connection() as conn:
        outcomes = [await requests.wait(conn, i, timeout=1, pickup_timeout=1) for i in (hibernate, resume, again)]
    assert [o["outcome"] for o in outcomes] == ["done", "done", "done"]
    assert manager.get(fred[0]).id == sandbox.id
    # Nobody takes a request: the CLI gives up and the request is cancelled, not left to surprise later.
    async with fleet.pool.connection() as conn:
        orphan = await requests.submit(conn, fred[0], "reclaim", "test")
        with pytest.raises(requests.RequestNotTaken):
            await requests.wait(conn, orphan, timeout=5, pickup_timeout=0.3)
    await manager.housekeeper.take_requests()
    assert manager.get(fred[0]) is not None


# -- the warm pool ------------------------------------------------------------------------------


async def test_a_new_user_claims_a_warm_sandbox_and_the_pool_refills(fleets):
    fleet = await fleets("pool", warm_pool_size=1)
    manager = await fleet.manager()
    deadline = time.monotonic() + 90
    while not manager.running.warm and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    [warm] = manager.running.warm
    assert (await row_of(fleet.pool, warm.id))["user_id"] is None
    gina = await fleet.user("gina")
    started = time.perf_counter()
    sandbox = await manager.ensure(*gina)
    result = await call(sandbox, "whoami")
    claim_s = time.perf_counter() - started
    print(f"\nwarm claim to first tool result: {claim_s * 1e3:.0f} ms")
    assert sandbox.id == warm.id and payload(result)["cwd"] == "/workspace"
    row = await row_of(fleet.pool, sandbox.id)
    assert (row["user_id"], row["state"]) == (gina[0], "Running") and row["claimed_at"]
    await call(sandbox, "write_file", path="/workspace/mine.txt", text="gina's")
    with workspace_of(manager, gina[0]) as workspace:  # the pooled workspace became gina's
        assert (workspace / "mine.txt").read_text() == "gina's"
    while not manager.running.warm and time.monotonic() < deadline + 60:
        await asyncio.sleep(0.2)
    assert len(manager.running.warm) == 1 and manager.running.warm[0].id != sandbox.id  # refilled in the background

    # A user with a workspace already (here: after a reclaim) starts cold: a pooled sandbox's is empty.
    await manager.reclaim(gina[0])
    again = await manager.ensure(*gina)
    assert again.id not in (sandbox.id, warm.id) and manager.running.warm
    assert "gina's" in text(await call(again, "read_file", path="/workspace/mine.txt"))


# -- tiers and caps -----------------------------------------------------------------------------


async def test_a_tier_sets_memory_pids_and_disk_and_a_disk_filler_hurts_only_its_sandbox(fleets, db_pool):
    fleet = await fleets("tier")
    async with db_pool.connection() as conn:
        await tiers.put(conn, Tier(f"small-{os.getpid()}", cpus=0.5, memory_mb=256, pids=64, disk_mb=32))
    manager = await fleet.manager()
    small = await fleet.user("hank", tier=f"small-{os.getpid()}")
    other = await fleet.user("ivy")
    sandbox = await manager.ensure(*small)
    neighbour = await manager.ensure(*other)
    assert sandbox.tier.memory_mb == 256
    filler = await sh(sandbox, "dd if=/dev/zero of=/workspace/fill bs=1M count=100 2>&1; df -m /workspace | tail -1")
    assert "No space left on device" in filler["stdout"], filler
    used, quota = manager.workspaces.usage(str(small[0]))
    assert quota is not None and quota <= 33 * 2**20 and used <= quota
    # The filler's neighbour and the filler's own sandbox still work.
    assert "ok" in (await sh(neighbour, "dd if=/dev/zero of=/workspace/f bs=1M count=40 2>&1 && echo ok"))["stdout"]
    assert "rm ok" in (await sh(sandbox, "rm /workspace/fill && echo rm ok"))["stdout"]
    forks = text(await call(sandbox, "fork_many", n=200))
    assert int(forks.split()[1].rstrip(",")) < 64 and "Resource temporarily unavailable" in forks, forks


async def test_a_tenant_cap_hibernates_the_least_recently_used_or_refuses_when_all_are_busy(fleets, db_pool):
    fleet = await fleets("cap")
    manager = await fleet.manager()
    async with db_pool.connection() as conn:
        await tiers.cap_tenant(conn, fleet.tenant, 1)
    jack, kate = await fleet.user("jack"), await fleet.user("kate")
    first = await manager.ensure(*jack)
    second = await manager.ensure(*kate)  # jack's was the least recently used: it hibernates for kate's
    assert (await row_of(fleet.pool, first.id))["state"] == "Hibernated"
    assert "cap" in (await row_of(fleet.pool, first.id))["reason"]
    busy = asyncio.create_task(call(second, "slow", seconds=3))
    await asyncio.sleep(0.3)
    with pytest.raises(QuotaExceeded, match="may run 1 sandbox at once"):
        await manager.ensure(*jack)  # kate's is busy: nothing may hibernate for jack
    await busy
    back = await manager.ensure(*jack)  # now kate's is idle and hibernates in turn
    assert back.id == first.id
    assert (await row_of(fleet.pool, second.id))["state"] == "Hibernated"


async def test_a_full_node_hibernates_the_least_recently_used(fleets):
    fleet = await fleets("node", max_running=1)
    manager = await fleet.manager()
    leo, mia = await fleet.user("leo"), await fleet.user("mia")
    first = await manager.ensure(*leo)
    counted = int(text(await call(first, "counter")))
    await manager.ensure(*mia)
    assert (await row_of(fleet.pool, first.id))["state"] == "Hibernated"
    back = await manager.ensure(*leo)
    assert int(text(await call(back, "counter"))) == counted + 1
    assert len(manager.running) == 1


# -- a restarted gateway brings every state to a consistent one ---------------------------------


async def gateway_dies(manager: SandboxManager) -> None:
    """What SIGKILL leaves: nothing of the manager runs any more (its sockets close with the process)."""
    await manager.stop_background()
    for sandbox in manager.running:
        await sandbox.client.close()
    manager.running.clear()


async def test_recovery_finishes_or_rolls_back_half_done_transitions(fleets):
    fleet = await fleets("recover")
    manager = await fleet.manager()
    running, sleeping, half_saved, lost = [await fleet.user(n) for n in ("nina", "omar", "pia", "quinn")]
    a = await manager.ensure(*running)
    counted = int(text(await call(a, "counter")))
    b = await manager.ensure(*sleeping)
    c = await manager.ensure(*half_saved)
    d = await manager.ensure(*lost)
    for user in (sleeping, half_saved, lost):
        await manager.hibernate(user[0])
    async with fleet.pool.connection() as conn:
        # a: died as its hibernation began (still running); c: died after the checkpoint, before its row said so;
        # d: its checkpoint vanished while it slept.
        await store.set_state(conn, a.id, State.HIBERNATING)
        await store.set_state(conn, c.id, State.HIBERNATING)
    shutil.rmtree(d.directory / "checkpoint")
    (fleet.home / "sandboxes" / "sbx-leftover00").mkdir()  # a directory with no row
    await gateway_dies(manager)

    successor = await fleet.manager()
    states = {r["id"]: r["state"] for r in await successor.list(include_ended=True)}
    assert states[a.id] == "Running" and successor.get(running[0]).id == a.id
    assert int(text(await call(successor.get(running[0]), "counter"))) == counted + 1
    assert states[b.id] == "Hibernated" and states[c.id] == "Hibernated"
    assert states[d.id] == "Failed"
    assert not (fleet.home / "sandboxes" / "sbx-leftover00").exists()
    assert set(os.listdir(fleet.home / "sandboxes")) == {a.id, b.id, c.id}
    assert {c.id for c in await fleet.backend.list()} == {a.id}
    assert fleet.backend.stray_processes(keep={a.id}) == []
    resumed = await successor.ensure(*half_saved)
    assert resumed.id == c.id
