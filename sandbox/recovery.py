"""A starting gateway takes over what the previous one left: every live row is brought to a
consistent state, and nothing without a row is left running, mounted or on disk.

| row state            | found                          | becomes                                  |
|----------------------|--------------------------------|------------------------------------------|
| Pending/Starting/Running | container running, supervisor answers | Running (adopted)               |
| Hibernating          | container running              | Running (the checkpoint never happened)  |
| Hibernating          | complete checkpoint, no container | Hibernated (it finished; only the row lagged) |
| Resuming             | container running              | Running (adopted; the checkpoint dropped) |
| Resuming             | complete checkpoint, no container | Hibernated (resumed again on the next call) |
| Hibernated           | complete checkpoint            | Hibernated                               |
| any other case       |                                | Failed, with the reason                  |

A checkpoint counts as complete once renamed from `checkpoint.partial` to `checkpoint`,
which happens only after the backend reported success.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING, Any

from sandbox import store, tiers
from sandbox.backends.base import Container
from sandbox.errors import SandboxUnavailable
from sandbox.store import State

if TYPE_CHECKING:
    from sandbox.manager import Sandbox, SandboxManager

log = logging.getLogger(__name__)


async def recover(manager: SandboxManager) -> None:
    async with manager.pool.connection() as conn:
        rows = await store.live_sandboxes(conn, manager.backend.name)
        tier_by_name = {r["name"]: tiers.Tier.from_row(r) for r in await tiers.list_tiers(conn)}
    containers = {c.id: c for c in await manager.backend.list()}
    outcomes = await asyncio.gather(
        *(_recover_one(manager, row, containers.get(row["id"]), tier_by_name) for row in rows)
    )
    kept = {row["id"] for row, state in zip(rows, outcomes) if state is not None}
    for sandbox_id in containers.keys() - {row["id"] for row in rows}:
        log.info("destroying sandbox %s: it has no live row", sandbox_id)
        await manager.backend.destroy(sandbox_id)
    if killed := manager.backend.kill_strays(kept):
        log.warning("killed %d stray sandbox processes", killed)
    mounted = {s.workspace for s in manager.running.values()}
    if unmounted := manager.workspaces.cleanup(manager.sandboxes_dir, keep=mounted):
        log.warning("unmounted %d workspaces of sandboxes that no longer run", unmounted)
    for directory in manager.sandboxes_dir.iterdir():
        if directory.name not in kept:
            manager._forget_files(directory, keep_logs=False)
    pooled = {s.workspace_key for s in manager.warm}
    for key in manager.workspaces.keys():
        if key.startswith("pool-") and key not in pooled:
            manager.workspaces.delete(key)
    counts: dict[str, int] = {}
    for state in outcomes:
        counts[str(state)] = counts.get(str(state), 0) + 1
    log.info("sandboxes after recovery: %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")


async def _recover_one(
    manager: SandboxManager, row: dict[str, Any], container: Container | None, tier_by_name: dict[str, tiers.Tier]
) -> State | None:
    """The state the row ends in (None: ended, Failed)."""
    from sandbox.manager import drop_channel

    sandbox_id, state = row["id"], State(row["state"])
    directory = manager.sandboxes_dir / sandbox_id
    running = container is not None and container.status == "running"
    partial = directory / "checkpoint.partial"
    if state == State.HIBERNATING and partial.is_dir():
        # The checkpoint is the sandbox's own work: it goes on after the gateway that asked for it
        # died. Let it end; if the sandbox then stopped with an image written, the hibernation is
        # finished here (a restore that finds the image unusable starts the user afresh).
        running = await _wait_while_checkpointing(manager, sandbox_id) if running else False
        if not running and any(f.stat().st_size > 0 for f in partial.iterdir() if f.is_file()):
            shutil.rmtree(directory / "checkpoint", ignore_errors=True)
            partial.rename(directory / "checkpoint")
        else:
            shutil.rmtree(partial, ignore_errors=True)
    complete = (directory / "checkpoint").is_dir()
    tier = tier_by_name.get(row["tier"] or tiers.DEFAULT_TIER) or tier_by_name[tiers.DEFAULT_TIER]

    if state == State.HIBERNATED and complete:
        return State.HIBERNATED
    if running and state != State.HIBERNATED:
        adopted = await _adopt(manager, row, tier)
        if not isinstance(adopted, str):
            if state == State.RESUMING:
                shutil.rmtree(directory / "checkpoint", ignore_errors=True)
            return State.RUNNING
        reason = adopted
    elif state in (State.HIBERNATING, State.RESUMING) and complete:
        if container is not None and container.status != "stopped":
            # A stopped one may hold the checkpoint itself (Docker keeps it with the container).
            await manager.backend.destroy(sandbox_id)
        manager.workspaces.unmount(directory / "workspace")
        drop_channel(directory)
        what = "hibernation" if state == State.HIBERNATING else "resume"
        await manager._set_state(sandbox_id, State.HIBERNATED, f"its {what} was interrupted by a gateway restart",
                                 user_id=row["user_id"])
        return State.HIBERNATED
    elif state == State.HIBERNATED:
        reason = "its checkpoint is missing"
    elif container is None:
        reason = "its container was gone when the gateway started"
    else:
        reason = f"its container was {container.status} when the gateway started"
    await manager.backend.destroy(sandbox_id)
    manager.workspaces.unmount(directory / "workspace")
    await manager._set_state(sandbox_id, State.FAILED, reason, user_id=row["user_id"])
    log.warning("sandbox %s failed on recovery: %s", sandbox_id, reason)
    return None


async def _wait_while_checkpointing(manager: SandboxManager, sandbox_id: str, timeout: float = 60.0) -> bool:
    """Whether the sandbox still runs once a checkpoint that may be under way has had its time
    (a saved sandbox stops; one whose checkpoint failed or never began runs on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if not await manager.backend.is_alive(sandbox_id):
            return False
        await asyncio.sleep(0.25)
    return True


async def _adopt(manager: SandboxManager, row: dict[str, Any], tier: tiers.Tier) -> Sandbox | str:
    """The running sandbox of `row` if its supervisor answers, else why not."""
    from sandbox.manager import TOKEN_FILE, Sandbox

    directory = manager.sandboxes_dir / row["id"]
    try:
        token = (directory / TOKEN_FILE).read_text()
    except OSError as exc:
        return f"its supervisor's token is unreadable ({exc.strerror})"
    client = manager._client(directory, token)
    try:
        await client.listen()
        await client.wait_ready(manager.adopt_timeout)
        await manager.backend.settle(row["id"])  # the previous gateway may have died before it could
    except (SandboxUnavailable, OSError) as exc:
        await client.close()
        return f"its supervisor did not answer after a gateway restart ({exc})"
    sandbox = Sandbox(
        id=row["id"],
        user_id=row["user_id"],
        tenant=row["tenant"],
        user=row["user"],
        tier=tier,
        client=client,
        directory=directory,
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )
    manager.running[sandbox.id] = sandbox
    if sandbox.user_id is None:
        manager.warm.append(sandbox)
    else:
        manager._by_user[sandbox.user_id] = sandbox
    if row["state"] != State.RUNNING:
        await manager._set_state(sandbox.id, State.RUNNING, "adopted after a gateway restart", user_id=row["user_id"])
    log.info("adopted sandbox %s of %s/%s", sandbox.id, sandbox.tenant, sandbox.user)
    return sandbox
