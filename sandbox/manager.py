"""One sandbox per user, through its whole life: started (cold, or claimed from the warm pool),
hibernated when idle with its memory, resumed on the next call, reclaimed when long unused.

States (the `sandboxes` table): Pending → Starting → Running → Hibernating → Hibernated →
Resuming → Running; any → Reclaimed; a failure → Failed with a reason. The row is written
before each step, so whatever a crashed gateway left behind, the next one can tell what to
adopt, finish, roll back or clean up (`sandbox.recovery`).

All steps for one user happen under that user's lock, so two calls racing for a sandbox
never start two; a start or resume runs as a task of its own that callers wait for, so a
caller that gives up does not abort it for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sandbox import recovery, store, tiers, tmpfs, wire
from sandbox.backends.base import SandboxBackend, SandboxSpec
from sandbox.client import SupervisorClient
from sandbox.errors import QuotaExceeded, SandboxUnavailable
from sandbox.housekeeping import Housekeeper
from sandbox.bundle import TOOLS_DIR
from sandbox.servers import ServerSource, ServerSpec, StaticServers, server_configs
from sandbox.store import State
from sandbox.supervisor.config import SupervisorConfig
from sandbox.tiers import Tier
from sandbox.workspaces import Workspaces

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
CHANNEL_DIR = "channel"
"""Where the sandbox's channel (its /run/mcpfleet) is, in the sandbox's dir."""
CHECKPOINT_DIR = "checkpoint"
"""A complete checkpoint image; written as CHECKPOINT_DIR + '.partial' and renamed when done."""
WORKSPACE_MOUNT = "workspace"
"""Where the user's workspace is mounted on the host, in the sandbox's dir, while it runs."""
SANDBOX_UID = 1000
SANDBOX_GID = 1000
"""Who the servers run as inside (an unprivileged user; also the owner of workspaces on the host)."""

REASON_CHARS = 200
START_BOOST_S = 10.0
"""How long a starting or resuming sandbox may use more CPU than its tier's share (`SandboxBackend.settle`):
enough for its servers' imports, and all that code which delays its readiness can gain by it."""

Transition = Callable[[psycopg.AsyncConnection, dict[str, Any]], Awaitable[None]]
"""Told of every state change, in the transaction that records it (the gateway audits them)."""


@dataclass
class Sandbox:
    id: str
    user_id: int | None
    """None while it waits in the warm pool."""
    tenant: str | None
    user: str | None
    tier: Tier
    client: SupervisorClient
    directory: Path
    created_at: datetime
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    state: State = State.RUNNING
    servers: tuple[ServerSpec, ...] | None = None
    """What its supervisor was last told to run; None when unknown (resumed or adopted)."""

    @property
    def workspace(self) -> Path:
        """The user's workspace as mounted on the host while the sandbox lives."""
        return self.directory / WORKSPACE_MOUNT

    @property
    def workspace_key(self) -> str:
        return workspace_key(self.user_id, self.id)


def workspace_key(user_id: int | None, sandbox_id: str) -> str:
    return str(user_id) if user_id is not None else f"pool-{sandbox_id}"


@dataclass(frozen=True)
class Lifecycle:
    """When sandboxes hibernate and go, and how many may run."""

    idle_hibernate_s: float = 600.0
    reclaim_after_s: float = 7 * 86400.0
    delete_workspace_on_reclaim: bool = False
    warm_pool_size: int = 0
    max_running: int = 50
    """Running sandboxes on this node, the warm pool included."""
    housekeeping_interval_s: float = 30.0


class SandboxManager:
    def __init__(
        self,
        home: Path,
        pool: AsyncConnectionPool,
        backend: SandboxBackend,
        servers: Sequence[ServerSpec] | ServerSource,
        *,
        lifecycle: Lifecycle = Lifecycle(),
        workspaces: Workspaces | None = None,
        on_transition: Transition | None = None,
        database_url: str | None = None,
        uid: int = SANDBOX_UID,
        gid: int = SANDBOX_GID,
        start_timeout: float = 120.0,
        start_boost_s: float = START_BOOST_S,
        adopt_timeout: float = 5.0,
        stop_grace: float = 3.0,
        drain_timeout: float = 30.0,
        touch_interval: float = 10.0,
        max_result_bytes: int = wire.MAX_LINE,
    ):
        """`home` is the fleet home: sandboxes live in home/sandboxes, workspaces in home/workspaces.
        With `database_url`, requests from the CLI are heard at once (LISTEN), else at the next sweep."""
        source = servers if hasattr(servers, "servers_for") else StaticServers(servers)  # type: ignore[arg-type]
        self.home = Path(home).absolute()
        self.max_result_bytes = max_result_bytes
        self.sandboxes_dir = self.home / "sandboxes"
        self.pool = pool
        self.backend = backend
        self.servers: ServerSource = source  # type: ignore[assignment]
        self._configuring: dict[str, asyncio.Lock] = {}
        self.lifecycle = lifecycle
        self.workspaces = workspaces or Workspaces(self.home / "workspaces", uid=uid, gid=gid)
        self.on_transition = on_transition
        self.uid, self.gid = uid, gid
        self.start_timeout = start_timeout
        self.start_boost_s = start_boost_s
        self.adopt_timeout = adopt_timeout
        self.stop_grace = stop_grace
        self.drain_timeout = drain_timeout
        self.touch_interval = touch_interval
        self.running: dict[str, Sandbox] = {}
        """Every running sandbox by id: users' and the warm pool's."""
        self._by_user: dict[int, Sandbox] = {}
        self.warm: list[Sandbox] = []
        self._warming = 0
        """Warm-pool sandboxes being started."""
        self._reserved: Counter[str | None] = Counter()
        """Places on the node held by starts and resumes under way, per tenant (None: the pool)."""
        self._bringing_up: dict[int, asyncio.Task[Sandbox]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._capacity = asyncio.Lock()
        self._touched: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.housekeeper = Housekeeper(self, database_url)

    # -- gateway lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Take over from the previous gateway (`sandbox.recovery`), then keep the pool warm."""
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sandboxes_dir, 0o711)
        await recovery.recover(self)
        self._tasks.append(asyncio.create_task(self._flush_touches_periodically()))
        self.housekeeper.start()
        self.refill_pool()

    async def close(self) -> None:
        """Graceful gateway stop: running sandboxes are stopped and Reclaimed (workspaces stay),
        hibernated ones stay hibernated for the next gateway."""
        self._closing = True
        await self.housekeeper.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._bringing_up.values()):
            task.cancel()
        await asyncio.gather(*self._bringing_up.values(), return_exceptions=True)
        await self._flush_touches()
        await asyncio.gather(
            *(self._retire(s, State.RECLAIMED, "the gateway stopped", graceful=True) for s in list(self.running.values()))
        )

    # -- per user -------------------------------------------------------------------------

    async def ensure(self, user_id: int, tenant: str, user: str) -> Sandbox:
        """The user's running sandbox: resumed, claimed from the pool or started, and waited for;
        running the servers the user may run now."""
        sandbox = self._by_user.get(user_id)
        if sandbox is not None and sandbox.state is State.RUNNING and sandbox.client.connected:
            self._touch(sandbox)
        else:
            sandbox = await self._ensure_running(user_id, tenant, user)
        wanted = await self.servers.servers_for(user_id)
        if sandbox.servers != wanted:
            await self._configure(sandbox, wanted)
        return sandbox

    async def _configure(self, sandbox: Sandbox, wanted: tuple[ServerSpec, ...]) -> None:
        """Tell a running sandbox's supervisor which servers to run (what the user may run changed
        since it started, or it was resumed or adopted and what it runs is unknown)."""
        lock = self._configuring.setdefault(sandbox.id, asyncio.Lock())
        async with lock:
            if sandbox.servers == wanted:
                return
            await asyncio.to_thread(self.servers.provision, sandbox.directory / TOOLS_DIR, wanted)
            await sandbox.client.configure([dataclasses.asdict(c) for c in server_configs(wanted)], self.start_timeout)
            sandbox.servers = wanted
            log.info("sandbox %s runs %s", sandbox.id, ", ".join(s.name for s in wanted) or "no servers")

    async def _ensure_running(self, user_id: int, tenant: str, user: str) -> Sandbox:
        if self._closing:
            raise SandboxUnavailable("the gateway is stopping")
        async with self._lock(user_id):
            sandbox = self._by_user.get(user_id)
            if sandbox is not None:
                reason = await self._why_not_usable(sandbox)
                if reason is None:
                    self._touch(sandbox)
                    return sandbox
                log.warning("sandbox %s of %s/%s is gone: %s", sandbox.id, tenant, user, reason)
                await self._retire(sandbox, State.FAILED, reason)
            task = self._bringing_up.get(user_id)
            if task is None:
                task = asyncio.create_task(self._bring_up(user_id, tenant, user))
                self._bringing_up[user_id] = task
                task.add_done_callback(lambda _: self._bringing_up.pop(user_id, None))
        # Shielded: a caller that gives up does not abort a start others may be waiting for.
        return await asyncio.shield(task)

    async def _why_not_usable(self, sandbox: Sandbox) -> str | None:
        """None if the sandbox can take calls (its channel is or came back), else why it counts as dead."""
        if sandbox.client.connected:
            return None
        if not await self.backend.is_alive(sandbox.id):
            # Not the console's tail: servers' stderr may hold what must not reach the database.
            return "it stopped unexpectedly (killed from outside, out of memory, or its supervisor exited)"
        try:
            await sandbox.client.wait_ready(self.adopt_timeout)
        except SandboxUnavailable:
            return "it runs, but its supervisor stopped answering"
        return None

    async def _bring_up(self, user_id: int, tenant: str, user: str) -> Sandbox:
        async with self.pool.connection() as conn:
            try:
                placement = await tiers.placement(conn, user_id)
                row = await store.live_sandbox_of(conn, user_id)
            except psycopg.Error as exc:
                raise SandboxUnavailable(f"the sandbox database is unavailable ({type(exc).__name__})") from exc
        if row is not None and row["state"] != State.HIBERNATED:
            raise SandboxUnavailable(f"{tenant}/{user} already has a live sandbox that this gateway does not manage")
        async with self._capacity:
            await self._make_room(tenant, placement.tenant_max_running, exclude_user=user_id)
            self._reserved[tenant] += 1
        try:
            if row is not None:
                return await self._resume(row, placement.tier)
            claimed = await self._claim(user_id, tenant, user, placement.tier)
            if claimed is not None:
                return claimed
            return await self._start_sandbox(user_id, tenant, user, placement.tier)
        finally:
            self._reserved[tenant] -= 1

    async def hibernate(self, user_id: int, reason: str = "requested") -> bool:
        """Checkpoint the user's running sandbox and stop it; False if none was running."""
        async with self._lock(user_id):
            sandbox = self._by_user.get(user_id)
            if sandbox is None or sandbox.state is not State.RUNNING:
                return False
            await self._hibernate(sandbox, reason)
            return True

    async def resume(self, user_id: int, tenant: str, user: str) -> Sandbox:
        return await self.ensure(user_id, tenant, user)

    async def reclaim(self, user_id: int, reason: str = "reclaimed") -> bool:
        """Stop the user's sandbox (running or hibernated), drop its checkpoint, mark it Reclaimed.
        The workspace stays unless the retention policy says otherwise. False if there was none."""
        async with self._lock(user_id):
            task = self._bringing_up.get(user_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            sandbox = self._by_user.get(user_id)
            if sandbox is not None:
                await self._retire(sandbox, State.RECLAIMED, reason, graceful=True)
                return True
            async with self.pool.connection() as conn:
                row = await store.live_sandbox_of(conn, user_id)
            if row is None:
                return False
            await self.backend.destroy(row["id"])
            self._forget_files(self.sandboxes_dir / row["id"], keep_logs=False)
            await self._set_state(row["id"], State.RECLAIMED, reason, user_id=user_id)
            self._apply_retention(workspace_key(user_id, row["id"]))
            return True

    async def list(self, *, include_ended: bool = False) -> list[dict[str, Any]]:
        """Rows of the sandboxes (live ones unless `include_ended`): id, user, tenant, state, times, reason."""
        await self._flush_touches()
        async with self.pool.connection() as conn:
            return await store.list_sandboxes(conn, include_ended=include_ended)

    def get(self, user_id: int) -> Sandbox | None:
        return self._by_user.get(user_id)

    # -- capacity -------------------------------------------------------------------------

    async def _make_room(self, tenant: str, tenant_max: int | None, *, exclude_user: int) -> None:
        """Hibernate the least recently used idle sandboxes until one more may run, or raise QuotaExceeded."""
        while True:
            users = [s for s in self.running.values() if s.user_id is not None]
            of_tenant = [s for s in users if s.tenant == tenant]
            tenant_full = tenant_max is not None and len(of_tenant) + self._reserved[tenant] >= tenant_max
            node_full = len(self.running) + self._reserved.total() >= self.lifecycle.max_running
            if not tenant_full and not node_full:
                return
            if node_full and not tenant_full and self.warm:
                await self._retire(self.warm[-1], State.RECLAIMED, "the node needed room")
                continue
            candidates = of_tenant if tenant_full else users
            idle = [
                s
                for s in candidates
                if s.user_id != exclude_user and s.state is State.RUNNING and s.client.in_flight == 0
            ]
            if not idle:
                if tenant_full:
                    raise QuotaExceeded(
                        f"tenant {tenant!r} may run {tenant_max} sandbox{'es' if tenant_max != 1 else ''} at once, "
                        "and all are busy; try again shortly"
                    )
                raise QuotaExceeded(
                    f"this node runs its maximum of {self.lifecycle.max_running} sandboxes and all are busy; "
                    "try again shortly"
                )
            victim = min(idle, key=lambda s: s.last_used_at)
            assert victim.user_id is not None
            why = f"tenant {tenant!r} reached its cap" if tenant_full else "the node was full"
            async with self._lock(victim.user_id):
                if victim.state is State.RUNNING and self.running.get(victim.id) is victim:
                    await self._hibernate(victim, f"least recently used when {why}")

    # -- the warm pool --------------------------------------------------------------------

    def refill_pool(self) -> None:
        """Start sandboxes in the background until the pool is full (as far as the node has room)."""
        if self._closing:
            return
        self._tasks = [t for t in self._tasks if not t.done()]
        missing = self.lifecycle.warm_pool_size - len(self.warm) - self._warming
        room = self.lifecycle.max_running - len(self.running) - self._reserved.total()
        for _ in range(max(0, min(missing, room))):
            self._warming += 1
            self._reserved[None] += 1
            self._tasks.append(asyncio.create_task(self._warm_one()))

    async def _warm_one(self) -> None:
        try:
            async with self.pool.connection() as conn:
                tier = await tiers.get(conn, tiers.DEFAULT_TIER)
            sandbox = await self._start_sandbox(None, None, None, tier)
        except Exception as exc:
            log.warning("could not start a warm-pool sandbox: %s", exc)
            return
        finally:
            self._warming -= 1
            self._reserved[None] -= 1
        self.warm.append(sandbox)

    async def _claim(self, user_id: int, tenant: str, user: str, tier: Tier) -> Sandbox | None:
        """A warm sandbox made the user's, if one fits: same tier, and a user without a workspace yet
        (a pooled sandbox's workspace is its own fresh one, which becomes the user's)."""
        key = workspace_key(user_id, "")
        if self.workspaces.exists(key) or (self.workspaces.root / key).exists():
            return None
        for sandbox in self.warm:
            if sandbox.tier == tier and sandbox.client.connected:
                break
        else:
            return None
        self.warm.remove(sandbox)
        started = time.perf_counter()
        try:
            self.workspaces.rename(sandbox.workspace_key, key)
            async with self.pool.connection() as conn, conn.transaction():
                await store.claim(conn, sandbox.id, user_id)
                await self._transition(conn, sandbox.id, State.RUNNING, "claimed from the warm pool", user_id)
        except Exception:
            self.running.pop(sandbox.id, None)
            await self._retire(sandbox, State.FAILED, "its claim failed")
            raise
        sandbox.user_id, sandbox.tenant, sandbox.user = user_id, tenant, user
        self._by_user[user_id] = sandbox
        self._touch(sandbox)
        log.info("sandbox %s claimed for %s/%s in %.1f ms", sandbox.id, tenant, user, (time.perf_counter() - started) * 1e3)
        self.refill_pool()
        return sandbox

    # -- starting, hibernating, resuming, stopping ------------------------------------------

    async def _start_sandbox(self, user_id: int | None, tenant: str | None, user: str | None, tier: Tier) -> Sandbox:
        sandbox_id = f"sbx-{secrets.token_hex(6)}"
        directory = self.sandboxes_dir / sandbox_id
        try:
            async with self.pool.connection() as conn, conn.transaction():
                row = await store.insert(conn, sandbox_id, user_id, self.backend.name, State.PENDING, tier.name)
                await self._transition(conn, sandbox_id, State.PENDING, None, user_id)
        except psycopg.errors.UniqueViolation:
            raise SandboxUnavailable(
                f"{tenant}/{user} already has a live sandbox that this gateway does not manage"
            ) from None
        except psycopg.Error as exc:
            raise SandboxUnavailable(f"the sandbox database is unavailable ({type(exc).__name__})") from exc
        token = secrets.token_urlsafe(32)
        client = self._client(directory, token)
        servers = await self.servers.servers_for(user_id)
        sandbox = Sandbox(
            id=sandbox_id,
            user_id=user_id,
            tenant=tenant,
            user=user,
            tier=tier,
            client=client,
            directory=directory,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
            servers=servers,
        )
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._prepare, sandbox, token)  # mkfs and mount take a while
            await client.listen()
            await self._set_state(sandbox_id, State.STARTING, user_id=user_id)
            await self.backend.start(self._spec(sandbox))
            await wait_ready(self.backend, client, sandbox_id, self.start_timeout, self.start_boost_s)
            await self._set_state(sandbox_id, State.RUNNING, user_id=user_id)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "its start was cancelled" if cancelled else f"it did not start: {exc}"
            await asyncio.shield(self._abandon(sandbox, reason))
            if isinstance(exc, SandboxUnavailable | asyncio.CancelledError):
                raise
            raise SandboxUnavailable(reason) from exc
        self.running[sandbox_id] = sandbox
        if user_id is not None:
            self._by_user[user_id] = sandbox
        failed = [f"{name}: {s.get('error')}" for name, s in client.servers.items() if s.get("state") != "ready"]
        log.info(
            "sandbox %s %s running after %.1fs%s",
            sandbox_id,
            f"of {tenant}/{user}" if user_id is not None else "(warm pool)",
            time.monotonic() - started,
            f" (servers not ready: {'; '.join(failed)})" if failed else "",
        )
        return sandbox

    async def _hibernate(self, sandbox: Sandbox, reason: str) -> None:
        """Under the user's lock: drain calls, detach the channel, checkpoint, unmount the workspace.

        If the checkpoint fails and the sandbox still runs, it goes back to Running; if it died, Failed.
        """
        assert sandbox.user_id is not None
        sandbox.state = State.HIBERNATING  # new calls now wait for the lock, then resume it
        await self._set_state(sandbox.id, State.HIBERNATING, reason, user_id=sandbox.user_id)
        started = time.perf_counter()
        try:
            await self._drain(sandbox)
            await sandbox.client.detach()
            partial = sandbox.directory / f"{CHECKPOINT_DIR}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            await self.backend.checkpoint(sandbox.id, partial)
            image = sandbox.directory / CHECKPOINT_DIR
            shutil.rmtree(image, ignore_errors=True)
            os.rename(partial, image)
        except SandboxUnavailable as exc:
            await self._hibernation_failed(sandbox, exc)
            return
        del self.running[sandbox.id]
        self._configuring.pop(sandbox.id, None)
        del self._by_user[sandbox.user_id]
        self._touched.discard(sandbox.id)
        await sandbox.client.close()
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        drop_channel(sandbox.directory)
        size = _tree_bytes(image)
        await self._set_state(
            sandbox.id, State.HIBERNATED, reason, user_id=sandbox.user_id, checkpoint_bytes=size
        )
        log.info(
            "sandbox %s of %s/%s hibernated in %.2fs (%.0f MiB): %s",
            sandbox.id, sandbox.tenant, sandbox.user, time.perf_counter() - started, size / 2**20, reason,
        )

    async def _drain(self, sandbox: Sandbox) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while sandbox.client.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if sandbox.client.in_flight:
            raise SandboxUnavailable(f"{sandbox.client.in_flight} calls still running after {self.drain_timeout:.0f}s")

    async def _hibernation_failed(self, sandbox: Sandbox, exc: Exception) -> None:
        shutil.rmtree(sandbox.directory / f"{CHECKPOINT_DIR}.partial", ignore_errors=True)
        if await self.backend.is_alive(sandbox.id):
            with contextlib.suppress(SandboxUnavailable):
                await sandbox.client.listen()  # the supervisor keeps trying to connect
                await sandbox.client.wait_ready(self.adopt_timeout)
            if sandbox.client.connected:
                sandbox.state = State.RUNNING
                await self._set_state(sandbox.id, State.RUNNING, f"hibernation failed: {exc}", user_id=sandbox.user_id)
                log.warning("sandbox %s stays running: hibernation failed: %s", sandbox.id, exc)
                return
        await self._retire(sandbox, State.FAILED, f"hibernation failed: {exc}")

    async def _resume(self, row: dict[str, Any], tier: Tier) -> Sandbox:
        """Restore a Hibernated sandbox from its checkpoint. If that fails, the row is Failed and the
        user gets a fresh sandbox on the same workspace (what was in memory is lost, files are not)."""
        user_id, tenant, user = row["user_id"], row["tenant"], row["user"]
        directory = self.sandboxes_dir / row["id"]
        started = time.perf_counter()
        try:
            token = (directory / TOKEN_FILE).read_text()
        except OSError as exc:
            await self._set_state(row["id"], State.FAILED, f"its token is unreadable ({exc.strerror})", user_id=user_id)
            return await self._start_sandbox(user_id, tenant, user, tier)
        sandbox = Sandbox(
            id=row["id"],
            user_id=user_id,
            tenant=tenant,
            user=user,
            tier=tier,  # a restored sandbox keeps the CPU/memory limits of its bundle until its next fresh start
            client=self._client(directory, token),
            directory=directory,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )
        try:
            await self._set_state(sandbox.id, State.RESUMING, user_id=user_id)
            await asyncio.to_thread(self._mount_workspace, sandbox)
            make_channel(directory, self.uid, self.gid)
            await sandbox.client.listen()
            await self.backend.restore(self._spec(sandbox), directory / CHECKPOINT_DIR)
            await wait_ready(self.backend, sandbox.client, sandbox.id, self.start_timeout, self.start_boost_s)
            await self._set_state(sandbox.id, State.RUNNING, "resumed", user_id=user_id)
        except BaseException as exc:
            reason = "its resume was cancelled" if isinstance(exc, asyncio.CancelledError) else f"its resume failed: {exc}"
            await asyncio.shield(self._abandon(sandbox, reason))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("sandbox %s of %s/%s: %s; starting a fresh one", sandbox.id, tenant, user, reason)
            return await self._start_sandbox(user_id, tenant, user, tier)
        shutil.rmtree(directory / CHECKPOINT_DIR, ignore_errors=True)
        self.running[sandbox.id] = sandbox
        self._by_user[user_id] = sandbox
        self._touch(sandbox)
        log.info("sandbox %s of %s/%s resumed in %.2fs", sandbox.id, tenant, user, time.perf_counter() - started)
        return sandbox

    async def _abandon(self, sandbox: Sandbox, reason: str) -> None:
        await sandbox.client.close()
        await self.backend.destroy(sandbox.id)
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        if sandbox.user_id is None:
            self.workspaces.delete(sandbox.workspace_key)
        self._forget_files(sandbox.directory, keep_logs=True)
        await self._set_state(sandbox.id, State.FAILED, reason, user_id=sandbox.user_id)

    async def _retire(self, sandbox: Sandbox, state: State, reason: str, *, graceful: bool = False) -> None:
        if self.running.get(sandbox.id) is sandbox:
            del self.running[sandbox.id]
            self._configuring.pop(sandbox.id, None)
        self._configuring.pop(sandbox.id, None)
        if sandbox.user_id is not None and self._by_user.get(sandbox.user_id) is sandbox:
            del self._by_user[sandbox.user_id]
        if sandbox in self.warm:
            self.warm.remove(sandbox)
        self._touched.discard(sandbox.id)
        sandbox.state = state
        await sandbox.client.close()
        await self.backend.destroy(sandbox.id, grace=self.stop_grace if graceful else 0.0)
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        # A failed sandbox keeps its logs to explain the failure.
        self._forget_files(sandbox.directory, keep_logs=state != State.RECLAIMED)
        await self._set_state(sandbox.id, state, reason, user_id=sandbox.user_id)
        if sandbox.user_id is None:
            self.workspaces.delete(sandbox.workspace_key)  # a pooled workspace was nobody's
        elif state == State.RECLAIMED:
            self._apply_retention(sandbox.workspace_key)

    def _apply_retention(self, key: str) -> None:
        if self.lifecycle.delete_workspace_on_reclaim and not self._closing:
            self.workspaces.delete(key)
            log.info("workspace %s deleted on reclaim (retention policy: delete)", key)

    def _prepare(self, sandbox: Sandbox, token: str) -> None:
        directory = sandbox.directory
        directory.mkdir(mode=0o711)
        # Outside the channel dir, so out of the sandbox's sight; a successor gateway reads it.
        fd = os.open(directory / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        channel = make_channel(directory, self.uid, self.gid)
        self._mount_workspace(sandbox)
        servers = sandbox.servers or ()
        self.servers.provision(directory / TOOLS_DIR, servers)
        config = SupervisorConfig(
            socket=f"{wire.CHANNEL_DIR}/{wire.SOCKET_NAME}",
            servers=server_configs(servers),
            token=token,
        )
        config.write(channel / wire.CONFIG_NAME, owner=(self.uid, self.gid))

    def _mount_workspace(self, sandbox: Sandbox) -> None:
        """The user's workspace (created at the tier's quota, or grown to it) mounted in the sandbox's dir."""
        key = sandbox.workspace_key
        if not self.workspaces.exists(key):
            # A workspace from before quotas is a plain directory where the image's mountpoint goes: move it in.
            legacy = self.workspaces.root / key
            seed = legacy if self.workspaces.quotas and legacy.is_dir() and not os.path.ismount(legacy) else None
            self.workspaces.create(key, sandbox.tier.disk_bytes, seed_from=seed)
            if seed is not None:
                shutil.rmtree(seed)
                log.info("workspace %s moved into an image with a %d MiB quota", key, sandbox.tier.disk_mb)
        else:
            _, quota = self.workspaces.usage(key)
            if quota is not None and quota < sandbox.tier.disk_bytes:
                self.workspaces.resize(key, sandbox.tier.disk_bytes)
        sandbox.workspace.mkdir(mode=0o700, exist_ok=True)
        self.workspaces.mount(key, sandbox.workspace)

    def _spec(self, sandbox: Sandbox) -> SandboxSpec:
        return SandboxSpec(
            id=sandbox.id,
            directory=sandbox.directory,
            workspace=sandbox.workspace,
            channel=sandbox.directory / CHANNEL_DIR,
            limits=sandbox.tier.limits,
            uid=self.uid,
            gid=self.gid,
        )

    def _forget_files(self, directory: Path, *, keep_logs: bool) -> None:
        """Remove a sandbox's runtime files (all of its dir unless `keep_logs`); never into a mounted workspace."""
        self.workspaces.unmount(directory / WORKSPACE_MOUNT)
        tmpfs.unmount(directory / CHANNEL_DIR)
        if _has_mounts_below(directory):
            log.error("not removing %s: something is still mounted below it", directory)
            return
        if keep_logs:
            for name in ("bundle", CHANNEL_DIR, CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.partial", WORKSPACE_MOUNT):
                path = directory / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    def _client(self, directory: Path, token: str) -> SupervisorClient:
        return SupervisorClient(
            directory / CHANNEL_DIR / wire.SOCKET_NAME, token=token, socket_owner=(self.uid, self.gid),
            max_result_bytes=self.max_result_bytes,
        )

    def _lock(self, user_id: int) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    async def _set_state(
        self,
        sandbox_id: str,
        state: State,
        reason: str | None = None,
        *,
        user_id: int | None = None,
        checkpoint_bytes: int | None = None,
    ) -> None:
        reason = _short_reason(reason)
        async with self.pool.connection() as conn, conn.transaction():
            await store.set_state(conn, sandbox_id, state, reason, checkpoint_bytes=checkpoint_bytes)
            await self._transition(conn, sandbox_id, state, reason, user_id)

    async def _transition(
        self, conn: psycopg.AsyncConnection, sandbox_id: str, state: State, reason: str | None, user_id: int | None
    ) -> None:
        if self.on_transition is not None:
            await self.on_transition(
                conn, {"sandbox": sandbox_id, "state": state.value, "reason": reason, "user_id": user_id}
            )

    # -- last use, idleness -----------------------------------------------------------------

    def _touch(self, sandbox: Sandbox) -> None:
        """Every call touches its sandbox; the database hears of it every `touch_interval`."""
        sandbox.last_used_at = datetime.now(timezone.utc)
        self._touched.add(sandbox.id)

    async def _flush_touches(self) -> None:
        if not self._touched:
            return
        ids, self._touched = sorted(self._touched), set()
        async with self.pool.connection() as conn:
            await store.touch(conn, ids)

    async def _flush_touches_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.touch_interval)
            try:
                await self._flush_touches()
            except psycopg.Error:
                log.exception("could not record when sandboxes were last used")

    def idle_since(self, now: datetime, seconds: float) -> list[Sandbox]:
        """Users' running sandboxes without a call for `seconds`, least recently used first."""
        cutoff = now - timedelta(seconds=seconds)
        idle = [
            s
            for s in self.running.values()
            if s.user_id is not None and s.state is State.RUNNING and s.last_used_at < cutoff and not s.client.in_flight
        ]
        return sorted(idle, key=lambda s: s.last_used_at)


def _short_reason(reason: str | None) -> str | None:
    """What a row (and `sandboxes list`, and the audit log) says of a state: one line, a sentence long.
    Backends keep their tools' output for the log; this holds if an error brings some anyway."""
    if reason is None:
        return None
    line = reason.strip().splitlines()[0] if reason.strip() else ""
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 1] + "…"


async def wait_ready(
    backend: SandboxBackend, client: SupervisorClient, sandbox_id: str, timeout: float, boost_s: float = START_BOOST_S
) -> None:
    """Wait up to `timeout` for the supervisor's hello, then hold the sandbox to its CPU share; after
    `boost_s` it is held to it anyway, so a start kept from becoming ready gains no CPU by it."""
    ready = asyncio.ensure_future(client.wait_ready(timeout))
    try:
        await asyncio.wait({ready}, timeout=boost_s)
        if not ready.done():
            await backend.settle(sandbox_id)
        await ready
    finally:
        ready.cancel()
    await backend.settle(sandbox_id)


def make_channel(directory: Path, uid: int, gid: int) -> Path:
    """The sandbox's channel dir, bound in read-write: a tiny tmpfs of its own (`sandbox.tmpfs`),
    so that nothing written there lands on the host's disk, outside the sandbox's quota."""
    channel = directory / CHANNEL_DIR
    tmpfs.mount(channel, size_bytes=tmpfs.CHANNEL_BYTES, inodes=tmpfs.CHANNEL_INODES, uid=uid, gid=gid)
    return channel


def drop_channel(directory: Path) -> None:
    channel = directory / CHANNEL_DIR
    tmpfs.unmount(channel)
    shutil.rmtree(channel, ignore_errors=True)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _has_mounts_below(directory: Path) -> bool:
    prefix = str(directory.resolve()) + "/"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    for line in mountinfo.splitlines():
        mountpoint = line.split()[4].replace("\\040", " ")
        if mountpoint.startswith(prefix):
            return True
    return False
