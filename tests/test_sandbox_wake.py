"""Waking a hibernated sandbox before its first call (`SandboxManager.wake`), against real runsc:
the resume begins in the background, calls racing it join it (one restore, memory kept), nothing
starts for a user with nothing hibernated, and a wake that fails is the next call's error."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest

from sandbox.errors import SandboxUnavailable
from sandbox.manager import SandboxManager
from tests.test_sandbox_lifecycle import call, fleets, row_of  # noqa: F401 (fleets: the fixture)
from tests.test_sandbox_supervisor import text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


def count_restores(manager: SandboxManager) -> list[str]:
    """The ids the manager's real backend is asked to restore, in order (the backend still does it)."""
    restored: list[str] = []
    backend: Any = manager.steps.backend
    restore = backend.restore

    async def counted(spec, image_dir):
        restored.append(spec.id)
        await restore(spec, image_dir)

    backend.restore = counted
    return restored


async def settled(manager: SandboxManager, user_id: int, timeout: float = 120.0) -> None:
    """Until the wake of `user_id` is over (it resumed, failed, or found nothing to do)."""
    deadline = time.monotonic() + timeout
    while user_id in manager._waking or user_id in manager._bringing_up:
        assert time.monotonic() < deadline, "the wake did not end"
        await asyncio.sleep(0.05)


async def test_a_wake_resumes_in_the_background_and_racing_calls_join_that_one_restore(fleets):  # noqa: F811
    fleet = await fleets("wake")
    manager = await fleet.manager()
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    first = int(text(await call(sandbox, "counter")))
    assert await manager.hibernate(alice[0]) is True
    restored = count_restores(manager)

    manager.wake(*alice)  # returns at once; the resume runs on its own
    assert manager.running.of_user(alice[0]) is None
    manager.wake(*alice)  # a second client of the same user: no second resume
    results = await asyncio.gather(*(manager.ensure(*alice) for _ in range(5)))
    manager.wake(*alice)  # running now: nothing to do
    await settled(manager, alice[0])

    assert restored == [sandbox.id]
    assert {s.id for s in results} == {sandbox.id}
    assert int(text(await call(results[0], "counter"))) == first + 1  # the same process, memory and all
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Running"
    # The used image is deleted after the resume returned, not left behind.
    deadline = time.monotonic() + 60
    while (sandbox.layout.checkpoint_spent).exists() or sandbox.layout.checkpoint.exists():
        assert time.monotonic() < deadline, "the used checkpoint image stayed on disk"
        await asyncio.sleep(0.1)


async def test_a_wake_alone_brings_the_sandbox_up_before_any_call(fleets):  # noqa: F811
    fleet = await fleets("wake-alone")
    manager = await fleet.manager()
    bob = await fleet.user("bob")
    sandbox = await manager.ensure(*bob)
    assert await manager.hibernate(bob[0]) is True
    manager.wake(*bob)
    await settled(manager, bob[0])
    running = manager.running.of_user(bob[0])
    assert running is not None and running.id == sandbox.id and running.client.connected
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Running"


async def test_a_wake_starts_nothing_for_a_user_with_nothing_hibernated(fleets):  # noqa: F811
    fleet = await fleets("wake-new")
    manager = await fleet.manager()
    carol = await fleet.user("carol")
    manager.wake(*carol)
    await settled(manager, carol[0])
    assert manager.running.of_user(carol[0]) is None
    rows = [r for r in await manager.list(include_ended=True) if r["user_id"] == carol[0]]
    assert rows == []  # no sandbox: the first call starts it, as before


async def test_a_wake_that_fails_is_the_error_of_the_next_call_and_is_not_retried_by_it(fleets):  # noqa: F811
    fleet = await fleets("wake-fail")
    manager = await fleet.manager()
    dave = await fleet.user("dave")
    sandbox = await manager.ensure(*dave)
    assert await manager.hibernate(dave[0]) is True
    restored = count_restores(manager)
    runsc = fleet.backend.runsc
    fleet.backend.runsc = "/nonexistent/runsc"  # gVisor gone: the restore fails, then the fresh start
    try:
        manager.wake(*dave)
        await settled(manager, dave[0])
        with pytest.raises(SandboxUnavailable, match="runsc is not installed"):
            await manager.ensure(*dave)
    finally:
        fleet.backend.runsc = runsc
    assert restored == [sandbox.id]  # the call raised what the wake met, it did not try again itself
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Failed"
    fresh = await manager.ensure(*dave)  # the next call tries afresh, on the same workspace
    assert fresh.id != sandbox.id and fresh.client.connected
