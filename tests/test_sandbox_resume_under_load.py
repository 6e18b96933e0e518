"""A user's sandbox resumes while other users' sandboxes start, hibernate, resume and stop around it,
against real runsc and real loop-mounted workspaces.

Every runsc gofer and sandbox starts in a mount namespace copied from the host's, with every
workspace mounted at that moment, and keeps the copy until it has pivoted into its own root. A
hibernation unmounting a workspace while such a process starts used to leave its image held, and
the resume right after refused it ("workspace ... is in use") once the holder outlasted the wait.
The sandboxes dir is a shared mount now (`sandbox.mounts.share`): the unmount reaches those copies.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from sandbox import mounts as hostmounts
from tests.test_sandbox_lifecycle import call, fleets, sandbox_processes
from tests.test_sandbox_supervisor import text

__all__ = ["fleets"]  # the fixture

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

ROUNDS = 3
OTHERS = 2


async def test_a_resume_succeeds_while_other_users_sandboxes_start_and_stop_around_it(fleets):
    fleet = await fleets("busy")
    manager = await fleet.manager()
    [mount] = [m for m in hostmounts.mounts() if m.mountpoint == manager.sandboxes_dir]
    assert hostmounts.is_shared(mount)  # made by the manager's start
    alice = await fleet.user("alice")
    others = [await fleet.user(f"other{i}") for i in range(OTHERS)]
    sandbox = await manager.ensure(*alice)
    await call(sandbox, "write_file", path="/workspace/kept.txt", text="kept")

    async def alice_sleeps_and_wakes() -> None:
        assert await manager.hibernate(alice[0]) is True
        resumed = await manager.ensure(*alice)
        assert resumed.id == sandbox.id
        assert "kept" in text(await call(resumed, "read_file", path="/workspace/kept.txt"))

    async def churn(user: tuple[int, str, str], round_: int) -> None:
        # A start (first round), a resume (the others), then a hibernation: each makes new runsc
        # processes, and each unmounts a workspace, while alice's sandbox does the same.
        other = await manager.ensure(*user)
        await call(other, "write_file", path="/workspace/round.txt", text=str(round_))
        assert await manager.hibernate(user[0]) is True

    for round_ in range(ROUNDS):
        results = await asyncio.gather(alice_sleeps_and_wakes(), *(churn(u, round_) for u in others), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"round {round_}: {failures!r}"
    for user in others:
        assert await manager.reclaim(user[0]) is True
        assert manager.workspaces.mounted(str(user[0])) is None
    assert sandbox_processes(fleet.backend, sandbox.id)
    await manager.close()
    assert hostmounts.mount_at(manager.sandboxes_dir) is None  # a graceful stop leaves the host as it was
    restarted = await fleet.manager()  # and the next start makes it anew
    [mount] = [m for m in hostmounts.mounts() if m.mountpoint == restarted.sandboxes_dir]
    assert hostmounts.is_shared(mount)
