"""One sandbox per user, through its whole life: started (cold, or claimed from the warm pool),
hibernated when idle with its memory, resumed on the next call, reclaimed when long unused.

States (the `sandboxes` table): Pending → Starting → Running → Hibernating → Hibernated →
Resuming → Running; any → Reclaimed; a failure → Failed with a reason.

The manager decides and keeps the books; the pieces it is made of do the rest:

| module                 | what                                                               |
|------------------------|--------------------------------------------------------------------|
| `sandbox.running`      | the sandboxes running here, by id, by user and in the warm pool    |
| `sandbox.capacity`     | the node's and tenants' caps: which sandbox makes room             |
| `sandbox.steps`        | start, hibernate, resume, adopt, stop one sandbox (`sandbox.boot`) |
| `sandbox.state`        | the rows: every change of state, and when each was last used       |
| `sandbox.layout`       | where a sandbox's files are                                        |
| `sandbox.recovery`     | taking over what the previous gateway left                        |
| `sandbox.housekeeping` | hibernating, reclaiming and refilling on its own; the CLI's requests |

All steps for one user happen under that user's lock, so two calls racing for a sandbox
never start two; a start or resume runs as a task of its own that callers wait for, so a
caller that gives up does not abort it for the others.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool

from core.tasks import Tasks
from sandbox import mounts as hostmounts
from sandbox import recovery, store, tiers, wire
from sandbox.backends.base import Cloning, Freezing, SandboxBackend
from sandbox.boot import START_BOOST_S
from sandbox.capacity import Capacity
from sandbox.errors import SandboxUnavailable
from sandbox.freezing import IdleFreezer
from sandbox.housekeeping import Housekeeper
from sandbox.layout import SandboxLayout
from sandbox.model_asks import ModelGate
from sandbox.running import Running, Sandbox, workspace_key
from sandbox.servers import ServerSource, ServerSpec, StaticServers, server_configs
from sandbox.span_relay import SpanSink
from sandbox.state import StateRecorder, Transition, UsageStamps
from sandbox.steps import ImageSealer, Steps
from sandbox.store import State
from sandbox.templates import Templates
from sandbox.tiers import Tier
from sandbox.tunnels import EgressPolicy
from sandbox.workspaces import Workspaces

__all__ = ["SANDBOX_GID", "SANDBOX_UID", "Lifecycle", "Sandbox", "SandboxManager", "Transition"]

log = logging.getLogger(__name__)
# A span for each way a call's sandbox comes up (the gateway's tracer provider exports them, if any).
tracer = trace.get_tracer("mcpfleet.sandbox")

WAKE_FAILURE_HOLD_S = 30.0
"""How long the failure of a resume begun by `wake` is kept for the user's next call to raise
(after that the call tries afresh)."""

SANDBOX_UID = 1000
SANDBOX_GID = 1000
"""Who the servers run as inside (an unprivileged user; also the owner of workspaces on the host)."""


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
    idle_freeze_s: float = 0.0
    """Freeze a running sandbox idle by calls this long and by CPU (`sandbox.freezing`); 0: never."""
    clone_templates: bool = False
    """Start sandboxes as clones of a tier's template checkpoint (`sandbox.templates`), where the backend can."""


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
        egress: EgressPolicy | None = None,
        models: ModelGate | None = None,
        spans: SpanSink | None = None,
        images: ImageSealer | None = None,
        quick_resume: bool = True,
    ):
        """`home` is the fleet home: sandboxes live in home/sandboxes, workspaces in home/workspaces.
        With `database_url`, requests from the CLI are heard at once (LISTEN), else at the next sweep.
        `egress` decides the connections servers that declare egress hosts ask for (None: none is made);
        `models` answers the model asks of servers that declare inference (None: none is answered);
        `spans` exports the spans servers make (None: they are not offered a trace endpoint)."""
        source = servers if hasattr(servers, "servers_for") else StaticServers(servers)
        self.home = Path(home).absolute()
        self.sandboxes_dir = SandboxLayout.root(self.home)
        self.pool = pool
        self.backend = backend
        self.servers: ServerSource = source  # type: ignore[assignment]
        self.lifecycle = lifecycle
        self.workspaces = workspaces or Workspaces(self.home / "workspaces", uid=uid, gid=gid)
        self.states = StateRecorder(pool, on_transition)
        self.usage = UsageStamps(pool, touch_interval)
        self.steps = Steps(
            self.home, backend, self.workspaces, self.servers, self.states,
            uid=uid, gid=gid, start_timeout=start_timeout, start_boost_s=start_boost_s,
            adopt_timeout=adopt_timeout, stop_grace=stop_grace, drain_timeout=drain_timeout,
            max_result_bytes=max_result_bytes, egress=egress, models=models, spans=spans, images=images, quick_resume=quick_resume,
        )  # fmt: skip
        self.running = Running()
        """Every running sandbox: users' and the warm pool's."""
        self.capacity = Capacity(self.running, lifecycle.max_running, lifecycle.warm_pool_size)
        self._configuring: dict[str, asyncio.Lock] = {}
        self._bringing_up: dict[int, asyncio.Task[Sandbox]] = {}
        self._waking: set[int] = set()
        self._wake_failures: dict[int, tuple[float, BaseException]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks = Tasks()
        self._closing = False
        self.housekeeper = Housekeeper(self, database_url)
        self.templates = Templates(self.steps) if lifecycle.clone_templates and isinstance(backend, Cloning) else None
        self.freezer = IdleFreezer(backend, lifecycle.idle_freeze_s) if isinstance(backend, Freezing) and lifecycle.idle_freeze_s > 0 else None

    async def freeze_idle(self) -> list[str]:
        """Freeze the sandboxes idle by calls and by CPU (`sandbox.freezing`); the ids frozen now."""
        return await self.freezer.sweep(self.running) if self.freezer is not None and not self._closing else []

    # -- gateway lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Take over from the previous gateway (`sandbox.recovery`), then keep the pool warm."""
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sandboxes_dir, 0o711)
        # The workspaces and channels are mounted below it: shared, their unmounts here reach the
        # copies that runsc processes started meanwhile hold until they pivot (`sandbox.mounts`).
        if (problem := await asyncio.to_thread(hostmounts.share, self.sandboxes_dir)) is not None:
            log.warning("%s is not a shared mount (%s): a workspace unmounted here may stay held by a "
                        "runsc process started meanwhile, and its next mount wait for it", self.sandboxes_dir, problem)
        await recovery.recover(self.steps, self.running, self.pool)
        self._tasks.spawn(self.usage.flush_periodically())
        self.housekeeper.start()
        self.refill_pool()
        if self.templates is not None:
            await self._prepare_default_template()

    async def stop_background(self) -> None:
        """Stop everything the manager does on its own (housekeeping, usage stamps, pool refills);
        no new sandbox starts from now on, and those running are left as they are."""
        self._closing = True
        await self.housekeeper.stop()
        await self._tasks.close()
        if self.templates is not None:
            await self.templates.stop()

    async def close(self) -> None:
        """Graceful gateway stop: running sandboxes are stopped and Reclaimed (workspaces stay),
        hibernated ones stay hibernated for the next gateway."""
        await self.stop_background()
        for task in list(self._bringing_up.values()):
            task.cancel()
        await asyncio.gather(*self._bringing_up.values(), return_exceptions=True)
        await self.usage.flush()
        await asyncio.gather(
            *(self._retire(s, State.RECLAIMED, "the gateway stopped", graceful=True) for s in self.running)
        )
        await self.steps.background.close()
        if self.templates is not None:
            await self.templates.close()
        await asyncio.to_thread(hostmounts.unshare, self.sandboxes_dir)  # only once nothing is mounted below it

    # -- per user -------------------------------------------------------------------------

    async def ensure(self, user_id: int, tenant: str, user: str) -> Sandbox:
        """The user's running sandbox: resumed, claimed from the pool or started, and waited for;
        running the servers the user may run now. If a resume begun by `wake` failed moments ago,
        that failure is raised here rather than tried again at once."""
        failed = self._wake_failures.pop(user_id, None)
        if failed is not None and time.monotonic() - failed[0] < WAKE_FAILURE_HOLD_S:
            raise failed[1]
        sandbox = self.running.of_user(user_id)
        if sandbox is not None and sandbox.state is State.RUNNING and sandbox.client.connected:
            self.usage.touch(sandbox)
        else:
            sandbox = await self._ensure_running(user_id, tenant, user)
        wanted = await self.servers.servers_for(user_id)
        if sandbox.servers != wanted:
            await self._configure(sandbox, wanted)
        return sandbox

    def wake(self, user_id: int, tenant: str, user: str) -> None:
        """Begin resuming the user's sandbox if it is hibernated, and return at once: the gateway
        calls this when it sees the user's client (its `initialize` or `server/discover`, any
        authenticated request), so the first `tools/call` finds it running or resuming. Never a
        second restore: a call joins the bring-up under way (`_ensure_running`), and a failure is
        kept for the user's next `ensure` to raise."""
        if self._closing or user_id in self._waking or user_id in self._bringing_up or self.running.of_user(user_id):
            return  # up, coming up, or being hibernated (its next call resumes it, as before)
        self._waking.add(user_id)
        self._tasks.spawn(self._wake(user_id, tenant, user), name=f"wake sandbox of {tenant}/{user}")

    async def _wake(self, user_id: int, tenant: str, user: str) -> None:
        try:
            async with self.pool.connection() as conn:
                row = await store.live_sandbox_of(conn, user_id)
            if row is None or row["state"] != State.HIBERNATED:
                return  # nothing to resume: a new user's sandbox starts on their first call, as before
            await self._ensure_running(user_id, tenant, user)
        except psycopg.Error as exc:  # the call will find the database down itself, and say so
            log.warning("could not look up the sandbox of %s/%s to wake it: %s", tenant, user, exc)
        except SandboxUnavailable as exc:
            log.warning("waking the sandbox of %s/%s failed: %s", tenant, user, exc)
            self._wake_failures[user_id] = (time.monotonic(), exc)
        finally:
            self._waking.discard(user_id)

    async def _configure(self, sandbox: Sandbox, wanted: tuple[ServerSpec, ...]) -> None:
        """Tell a running sandbox's supervisor which servers to run (what the user may run changed
        since it started, or it was resumed or adopted and what it runs is unknown)."""
        lock = self._configuring.setdefault(sandbox.id, asyncio.Lock())
        async with lock:
            if sandbox.servers == wanted:
                return
            await asyncio.to_thread(self.servers.provision, sandbox.layout.tools, wanted)
            await sandbox.client.configure([dataclasses.asdict(c) for c in server_configs(wanted)], self.steps.start_timeout)
            sandbox.servers = wanted
            log.info("sandbox %s runs %s", sandbox.id, ", ".join(s.name for s in wanted) or "no servers")

    async def _ensure_running(self, user_id: int, tenant: str, user: str) -> Sandbox:
        if self._closing:
            raise SandboxUnavailable("the gateway is stopping")
        async with self._lock(user_id):
            sandbox = self.running.of_user(user_id)
            if sandbox is not None:
                reason = await self.steps.why_not_usable(sandbox)
                if reason is None:
                    self.usage.touch(sandbox)
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

    async def _bring_up(self, user_id: int, tenant: str, user: str) -> Sandbox:
        try:  # the pool's wait for a connection too: a PoolTimeout is a psycopg error
            async with self.pool.connection() as conn:
                placement = await tiers.placement(conn, user_id)
                row = await store.live_sandbox_of(conn, user_id)
        except psycopg.Error as exc:
            raise SandboxUnavailable(f"the sandbox database is unavailable ({type(exc).__name__})") from exc
        if row is not None and row["state"] != State.HIBERNATED:
            raise SandboxUnavailable(f"{tenant}/{user} already has a live sandbox that this gateway does not manage")
        async with self.capacity.lock:
            await self._make_room(tenant, placement.tenant_max_running, exclude_user=user_id)
            self.capacity.hold(tenant)
        try:
            sandbox = None
            if row is not None:
                # If the restore fails, the user gets a fresh sandbox on the same workspace.
                with tracer.start_as_current_span("sandbox resume", attributes={"mcpfleet.sandbox.id": row["id"]}):
                    sandbox = await self.steps.resume(row, placement.tier)
            else:
                with tracer.start_as_current_span("sandbox claim") as span:
                    sandbox = await self._claim(user_id, tenant, user, placement.tier)
                    span.set_attribute("mcpfleet.sandbox.claimed", sandbox is not None)
            if sandbox is None and self.templates is not None:
                with tracer.start_as_current_span("sandbox clone") as span:
                    sandbox = await self.templates.clone(user_id, tenant, user, placement.tier)
                    span.set_attribute("mcpfleet.sandbox.cloned", sandbox is not None)
                if sandbox is not None:
                    self.running.add(sandbox)
                    return sandbox
            if sandbox is None:
                with tracer.start_as_current_span("sandbox cold start", attributes={"mcpfleet.sandbox.tier": placement.tier.name}):
                    sandbox = await self.steps.start(user_id, tenant, user, placement.tier)
                self.running.add(sandbox)
            elif row is not None:
                self.running.add(sandbox)
                self.usage.touch(sandbox)
            return sandbox
        finally:
            self.capacity.release(tenant)

    async def hibernate(self, user_id: int, reason: str = "requested") -> bool:
        """Checkpoint the user's running sandbox and stop it; False if none was running."""
        async with self._lock(user_id):
            sandbox = self.running.of_user(user_id)
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
            sandbox = self.running.of_user(user_id)
            if sandbox is not None:
                await self._retire(sandbox, State.RECLAIMED, reason, graceful=True)
                return True
            async with self.pool.connection() as conn:
                row = await store.live_sandbox_of(conn, user_id)
            if row is None:
                return False
            await self.steps.reclaim_row(row, reason)
            self._apply_retention(workspace_key(user_id, row["id"]))
            return True

    async def list(self, *, include_ended: bool = False) -> list[dict[str, Any]]:
        """Rows of the sandboxes (live ones unless `include_ended`): id, user, tenant, state, times, reason."""
        await self.usage.flush()
        async with self.pool.connection() as conn:
            return await store.list_sandboxes(conn, include_ended=include_ended)

    def get(self, user_id: int) -> Sandbox | None:
        return self.running.of_user(user_id)

    def idle_since(self, now: datetime, seconds: float) -> builtins.list[Sandbox]:
        """Users' running sandboxes without a call for `seconds`, least recently used first."""
        return self.running.idle_since(now, seconds)

    async def flush_usage(self) -> None:
        """Write when each sandbox was last used to its row now (reclaiming reads the rows)."""
        await self.usage.flush()

    async def _prepare_default_template(self) -> None:
        try:
            async with self.pool.connection() as conn:
                tier = await tiers.get(conn, tiers.DEFAULT_TIER)
        except psycopg.Error as exc:
            log.warning("no sandbox template yet: the tiers could not be read (%s)", exc)
            return
        assert self.templates is not None
        self.templates.prepare(tier)

    # -- capacity and the warm pool ---------------------------------------------------------

    async def _make_room(self, tenant: str, tenant_max: int | None, *, exclude_user: int) -> None:
        """Hibernate the least recently used idle sandboxes until one more may run, or raise QuotaExceeded."""
        while (eviction := self.capacity.eviction(tenant, tenant_max, exclude_user=exclude_user)) is not None:
            victim = eviction.sandbox
            if not eviction.hibernate:
                await self._retire(victim, State.RECLAIMED, eviction.reason)
                continue
            assert victim.user_id is not None
            async with self._lock(victim.user_id):
                if victim.state is State.RUNNING and self.running.holds(victim):
                    await self._hibernate(victim, eviction.reason)

    def refill_pool(self) -> None:
        """Start sandboxes in the background until the pool is full (as far as the node has room)."""
        if self._closing:
            return
        for _ in range(self.capacity.pool_shortfall()):
            self.capacity.hold(None)
            self._tasks.spawn(self._warm_one())

    async def _warm_one(self) -> None:
        try:
            async with self.pool.connection() as conn:
                tier = await tiers.get(conn, tiers.DEFAULT_TIER)
            sandbox = await self.templates.clone(None, None, None, tier) if self.templates is not None else None
            if sandbox is None:
                sandbox = await self.steps.start(None, None, None, tier)
        except Exception as exc:
            log.warning("could not start a warm-pool sandbox: %s", exc)
            return
        finally:
            self.capacity.release(None)
        self.running.add(sandbox)

    async def _claim(self, user_id: int, tenant: str, user: str, tier: Tier) -> Sandbox | None:
        """A warm sandbox made the user's, if one fits: same tier, and a user without a workspace yet
        (a pooled sandbox's workspace is its own fresh one, which becomes the user's)."""
        key = workspace_key(user_id, "")
        if self.workspaces.exists(key) or (self.workspaces.root / key).exists():
            return None
        sandbox = self.running.take_warm(tier)
        if sandbox is None:
            return None
        started = time.perf_counter()
        try:
            self.workspaces.rename(sandbox.workspace_key, key)
            await self.states.claim(sandbox.id, user_id)
        except Exception:
            await self._retire(sandbox, State.FAILED, "its claim failed")
            raise
        self.running.assign(sandbox, user_id, tenant, user)
        self.usage.touch(sandbox)
        log.info("sandbox %s claimed for %s/%s in %.1f ms", sandbox.id, tenant, user, (time.perf_counter() - started) * 1e3)
        self.refill_pool()
        return sandbox

    # -- hibernating, stopping --------------------------------------------------------------

    async def _hibernate(self, sandbox: Sandbox, reason: str) -> None:
        """Under the user's lock. If the checkpoint fails and the sandbox still runs, it goes back to
        Running; if it died, Failed."""
        started = time.perf_counter()
        try:
            saved = await self.steps.checkpoint(sandbox, reason)
        except SandboxUnavailable as exc:
            await self._retire(sandbox, State.FAILED, str(exc))
            return
        if saved:
            self._forget(sandbox)
            await self.steps.put_away(sandbox, reason, started)

    async def _retire(self, sandbox: Sandbox, state: State, reason: str, *, graceful: bool = False) -> None:
        self._forget(sandbox)
        await self.steps.stop(sandbox, state, reason, graceful=graceful)
        if sandbox.user_id is not None and state == State.RECLAIMED:
            self._apply_retention(sandbox.workspace_key)

    def _forget(self, sandbox: Sandbox) -> None:
        """The sandbox no longer runs here (whatever becomes of it)."""
        self.running.remove(sandbox)
        self._configuring.pop(sandbox.id, None)
        self.usage.forget(sandbox.id)

    def _apply_retention(self, key: str) -> None:
        if self.lifecycle.delete_workspace_on_reclaim and not self._closing:
            self.workspaces.delete(key)
            log.info("workspace %s deleted on reclaim (retention policy: delete)", key)

    def _lock(self, user_id: int) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock
