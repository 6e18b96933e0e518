"""Idle sandboxes frozen in their cgroup (`sandbox.freezing`, `sandbox.backends.freezer`), on real runsc:
frozen only when idle by calls and by CPU, no CPU used while frozen, and whatever reaches a frozen
sandbox afterwards (a call, a ping, a hibernation, a reclaim, a runsc exec) finds it thawed."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from sandbox.backends.freezer import CgroupFreezer
from sandbox.backends.runsc import RunscBackend
from sandbox.manager import SandboxManager
from tests.test_sandbox_lifecycle import call, fleets, gateway_dies, sh  # noqa: F401 - fleets is a fixture
from tests.test_sandbox_supervisor import text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

SAMPLE_S = 1.0


async def sweep_until_frozen(manager: SandboxManager, sandbox_id: str, sweeps: int = 4) -> list[str]:
    """Sweeps a second apart (idleness by CPU is a rate: it takes two readings); every id frozen."""
    frozen: list[str] = []
    for _ in range(sweeps):
        frozen += await manager.freeze_idle()
        if sandbox_id in frozen:
            break
        await asyncio.sleep(SAMPLE_S)
    return frozen


def freezer_state(manager: SandboxManager, sandbox_id: str) -> str:
    freezer: CgroupFreezer = manager.backend.freezer  # type: ignore[attr-defined]
    state = freezer.root / "freezer" / freezer.relative / sandbox_id / "freezer.state"
    if state.exists():
        return state.read_text().strip()
    return "FROZEN" if "frozen 1" in (freezer.root / freezer.relative / sandbox_id / "cgroup.events").read_text() else "THAWED"


async def test_an_idle_sandbox_is_frozen_uses_no_cpu_and_its_next_call_thaws_it(fleets):
    fleet = await fleets("frz", idle_freeze_s=0.5)
    manager = await fleet.manager()
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    first = int(text(await call(sandbox, "counter")))
    assert await manager.freeze_idle() == []  # a call just now: not idle yet
    await asyncio.sleep(1.0)
    assert sandbox.id in await sweep_until_frozen(manager, sandbox.id)
    assert fleet.backend.is_frozen(sandbox.id) and freezer_state(manager, sandbox.id) == "FROZEN"
    before = fleet.backend.cpu_seconds(sandbox.id)
    await asyncio.sleep(2.0)
    assert fleet.backend.cpu_seconds(sandbox.id) == before  # not a nanosecond while frozen
    assert await manager.freeze_idle() == []  # frozen already
    # The next call thaws it on its way in, and finds the same server process, memory and all.
    assert int(text(await call(sandbox, "counter"))) == first + 1
    assert not fleet.backend.is_frozen(sandbox.id) and freezer_state(manager, sandbox.id) == "THAWED"
    assert fleet.backend.cpu_seconds(sandbox.id) > before


async def test_a_sandbox_working_inside_is_not_frozen(fleets):
    fleet = await fleets("busy", idle_freeze_s=0.5)
    manager = await fleet.manager()
    bob = await fleet.user("bob")
    sandbox = await manager.ensure(*bob)
    await sh(sandbox, "while :; do :; done", background=True)  # a build left running, say
    await asyncio.sleep(1.0)
    assert sandbox.id not in await sweep_until_frozen(manager, sandbox.id)
    assert not fleet.backend.is_frozen(sandbox.id) and freezer_state(manager, sandbox.id) == "THAWED"
    await sh(sandbox, "pkill -f 'while :' || true")


async def test_a_frozen_sandbox_answers_pings_exec_hibernation_resume_and_reclaim(fleets):
    fleet = await fleets("frz2", idle_freeze_s=0.5)
    manager = await fleet.manager()
    carol = await fleet.user("carol")
    sandbox = await manager.ensure(*carol)
    await call(sandbox, "write_file", path="/workspace/kept.txt", text="kept")
    await asyncio.sleep(1.0)
    assert sandbox.id in await sweep_until_frozen(manager, sandbox.id)
    await sandbox.client.ping(timeout=10)  # any message thaws it, not only a call
    assert not fleet.backend.is_frozen(sandbox.id)

    assert sandbox.id in await sweep_until_frozen(manager, sandbox.id)
    code, out = await fleet.backend.run_inside(sandbox.id, "cat /workspace/kept.txt")  # runsc exec
    assert (code, out) == (0, "kept") and not fleet.backend.is_frozen(sandbox.id)

    assert sandbox.id in await sweep_until_frozen(manager, sandbox.id)
    assert await manager.hibernate(carol[0]) is True  # its detach thaws it, then the checkpoint
    resumed = await manager.ensure(*carol)
    assert "kept" in text(await call(resumed, "read_file", path="/workspace/kept.txt"))

    await asyncio.sleep(1.0)
    assert resumed.id in await sweep_until_frozen(manager, resumed.id)
    assert await manager.reclaim(carol[0]) is True
    assert not await fleet.backend.is_alive(resumed.id)


async def test_a_message_sent_while_a_freeze_settles_wins(fleets):
    # The freeze is marked before the freezer is written, so a thaw in between (a call's message)
    # is written after it and the freeze reports it did not happen.
    fleet = await fleets("frz3", idle_freeze_s=0.5)
    manager = await fleet.manager()
    dan = await fleet.user("dan")
    sandbox = await manager.ensure(*dan)
    freezing = asyncio.create_task(fleet.backend.freeze(sandbox.id))
    await asyncio.sleep(0)  # the freeze has begun: marked, FROZEN written
    fleet.backend.thaw(sandbox.id)
    await freezing
    assert not fleet.backend.is_frozen(sandbox.id) and freezer_state(manager, sandbox.id) == "THAWED"
    assert text(await call(sandbox, "counter"))


async def test_a_sandbox_frozen_by_a_gateway_that_died_is_adopted_by_the_next(fleets):
    fleet = await fleets("frz4", idle_freeze_s=0.5)
    manager = await fleet.manager()
    finn = await fleet.user("finn")
    sandbox = await manager.ensure(*finn)
    counted = int(text(await call(sandbox, "counter")))
    await asyncio.sleep(1.0)
    assert sandbox.id in await sweep_until_frozen(manager, sandbox.id)
    await gateway_dies(manager)
    # The next gateway's backend knows nothing of what the last one froze.
    fleet.backend = RunscBackend(fleet.home / "runsc", cgroup_parent=fleet.backend.cgroup_parent)
    successor = await fleet.manager()
    adopted = successor.get(finn[0])
    assert adopted is not None and adopted.id == sandbox.id
    assert int(text(await call(adopted, "counter"))) == counted + 1  # the same server process
    assert freezer_state(successor, sandbox.id) == "THAWED"


async def test_freezing_is_off_at_zero(fleets):
    fleet = await fleets("nofrz", idle_freeze_s=0.0)
    manager = await fleet.manager()
    erin = await fleet.user("erin")
    sandbox = await manager.ensure(*erin)
    await asyncio.sleep(1.0)
    assert await sweep_until_frozen(manager, sandbox.id, sweeps=2) == []
    assert freezer_state(manager, sandbox.id) == "THAWED"
