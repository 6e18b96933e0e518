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
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from sandbox import store, tiers
from sandbox.backends.base import Container, Freezing
from sandbox.layout import SandboxLayout, drop_channel, forget
from sandbox.running import Running
from sandbox.steps import Steps
from sandbox.store import State
from sandbox.templates import TEMPLATE_PREFIX

log = logging.getLogger(__name__)


async def recover(steps: Steps, running: Running, pool: AsyncConnectionPool) -> None:
    """Bring every live row of this backend to a consistent state; the sandboxes adopted are added
    to `running`, and everything else of the backend's and on disk without a live row goes."""
    backend, workspaces = steps.backend, steps.workspaces
    async with pool.connection() as conn:
        rows = await store.live_sandboxes(conn, backend.name)
        tier_by_name = {r["name"]: tiers.Tier.from_row(r) for r in await tiers.list_tiers(conn)}
    if isinstance(backend, Freezing) and (thawed := backend.thaw_all()):
        # Left frozen by the gateway before this one: `runsc list` would wait on them, their supervisors never reconnect.
        log.info("thawed %d sandboxes a previous gateway had frozen", len(thawed))
    containers = {c.id: c for c in await backend.list()}
    outcomes = await asyncio.gather(
        *(_recover_one(steps, running, row, containers.get(row["id"]), tier_by_name) for row in rows)
    )
    kept = {row["id"] for row, state in zip(rows, outcomes) if state is not None}
    for sandbox_id in containers.keys() - {row["id"] for row in rows}:
        log.info("destroying sandbox %s: it has no live row", sandbox_id)
        await backend.destroy(sandbox_id)
    if killed := backend.kill_strays(kept):
        log.warning("killed %d stray sandbox processes", killed)
    root = SandboxLayout.root(steps.home)
    mounted = {s.workspace for s in running}
    if unmounted := workspaces.cleanup(root, keep=mounted):
        log.warning("unmounted %d workspaces of sandboxes that no longer run", unmounted)
    for directory in root.iterdir():
        if directory.name not in kept:
            forget(steps.layout(directory.name), workspaces, keep_logs=False)
    pooled = {s.workspace_key for s in running.warm}
    for key in workspaces.keys():
        # A template's workspace too: templates go with the gateway that built them (`sandbox.templates`).
        if (key.startswith("pool-") and key not in pooled) or key.startswith(TEMPLATE_PREFIX):
            workspaces.delete(key)
    counts: dict[str, int] = {}
    for state in outcomes:
        counts[str(state)] = counts.get(str(state), 0) + 1
    log.info("sandboxes after recovery: %s", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")


async def _recover_one(
    steps: Steps, running: Running, row: dict[str, Any], container: Container | None, tier_by_name: dict[str, tiers.Tier]
) -> State | None:
    """The state the row ends in (None: ended, Failed)."""
    sandbox_id, state = row["id"], State(row["state"])
    layout = steps.layout(sandbox_id)
    alive = container is not None and container.status == "running"
    partial = layout.checkpoint_partial
    # A used image whose deletion the previous gateway did not finish (it may be unsealed memory).
    shutil.rmtree(layout.checkpoint_spent, ignore_errors=True)
    if state == State.HIBERNATING and partial.is_dir():
        # The checkpoint is the sandbox's own work: it goes on after the gateway that asked for it
        # died. Let it end; if the sandbox then stopped with an image written, the hibernation is
        # finished here (a restore that finds the image unusable starts the user afresh).
        alive = await _wait_while_checkpointing(steps, sandbox_id) if alive else False
        if not alive and any(f.stat().st_size > 0 for f in partial.iterdir() if f.is_file()):
            shutil.rmtree(layout.checkpoint, ignore_errors=True)
            partial.rename(layout.checkpoint)
        else:
            shutil.rmtree(partial, ignore_errors=True)
    if layout.checkpoint.is_dir() and steps.images is not None:
        await _sealed(steps, layout.checkpoint, sandbox_id)
    complete = layout.checkpoint.is_dir()
    tier = tier_by_name.get(row["tier"] or tiers.DEFAULT_TIER) or tier_by_name[tiers.DEFAULT_TIER]

    if state == State.HIBERNATED and complete:
        return State.HIBERNATED
    if alive and state != State.HIBERNATED:
        adopted = await steps.adopt(row, tier)
        if not isinstance(adopted, str):
            running.add(adopted)
            if state == State.RESUMING:
                shutil.rmtree(layout.checkpoint, ignore_errors=True)
            return State.RUNNING
        reason = adopted
    elif state in (State.HIBERNATING, State.RESUMING) and complete:
        if container is not None and container.status != "stopped":
            # A stopped one may hold the checkpoint itself (Docker keeps it with the container).
            await steps.backend.destroy(sandbox_id)
        steps.workspaces.unmount(layout.workspace)
        drop_channel(layout)
        what = "hibernation" if state == State.HIBERNATING else "resume"
        await steps.states.set(sandbox_id, State.HIBERNATED, f"its {what} was interrupted by a gateway restart",
                               user_id=row["user_id"])  # fmt: skip
        return State.HIBERNATED
    elif state == State.HIBERNATED:
        reason = "its checkpoint is missing"
    elif container is None:
        reason = "its container was gone when the gateway started"
    else:
        reason = f"its container was {container.status} when the gateway started"
    await steps.backend.destroy(sandbox_id)
    steps.workspaces.unmount(layout.workspace)
    await steps.states.set(sandbox_id, State.FAILED, reason, user_id=row["user_id"])
    log.warning("sandbox %s failed on recovery: %s", sandbox_id, reason)
    return None


async def _wait_while_checkpointing(steps: Steps, sandbox_id: str, timeout: float = 60.0) -> bool:
    """Whether the sandbox still runs once a checkpoint that may be under way has had its time
    (a saved sandbox stops; one whose checkpoint failed or never began runs on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if not await steps.backend.is_alive(sandbox_id):
            return False
        await asyncio.sleep(0.25)
    return True


async def _sealed(steps: Steps, checkpoint: Path, sandbox_id: str) -> None:
    """A checkpoint holds memory, so it stays on disk only sealed: one that a gateway's death left in
    the clear (its checkpoint ended after the gateway, or a seal or unseal was cut short) is sealed
    now; if it cannot be (Vault unreachable), it is dropped and the sandbox starts afresh."""
    assert steps.images is not None
    try:
        await asyncio.to_thread(steps.images.seal, checkpoint)
    except Exception as exc:
        log.warning("sandbox %s: its checkpoint could not be sealed (%s); dropping it", sandbox_id, exc)
        shutil.rmtree(checkpoint, ignore_errors=True)
