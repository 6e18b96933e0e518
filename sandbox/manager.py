"""One sandbox per user: started on first use, watched, recovered after a gateway restart.

The database row of a sandbox is written before each step, so whatever state a
crashed gateway left behind, the next one can tell what to adopt and what to
clean up: `start()` re-adopts running sandboxes whose supervisor answers and
destroys the rest; no runsc process outlives its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sandbox import store, wire
from sandbox.backend import SandboxBackend, SandboxSpec
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.limits import Limits
from sandbox.servers import ServerSpec
from sandbox.store import State
from sandbox.supervisor.config import ServerConfig, SupervisorConfig

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
"""Who the servers run as inside (an unprivileged user; also the owner of workspaces on the host)."""


@dataclass
class Sandbox:
    id: str
    user_id: int
    tenant: str
    user: str
    client: SupervisorClient
    directory: Path
    workspace: Path
    created_at: datetime
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class SandboxManager:
    def __init__(
        self,
        home: Path,
        pool: AsyncConnectionPool,
        backend: SandboxBackend,
        servers: Sequence[ServerSpec],
        limits: Limits = Limits(),
        *,
        uid: int = SANDBOX_UID,
        gid: int = SANDBOX_GID,
        start_timeout: float = 120.0,
        adopt_timeout: float = 5.0,
        stop_grace: float = 3.0,
        touch_interval: float = 10.0,
    ):
        """`home` is the fleet home: sandboxes live in home/sandboxes, workspaces in home/workspaces."""
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique: {names}")
        self.home = Path(home).absolute()
        self.sandboxes_dir = self.home / "sandboxes"
        self.workspaces_dir = self.home / "workspaces"
        self.pool = pool
        self.backend = backend
        self.servers = list(servers)
        self.limits = limits
        self.uid, self.gid = uid, gid
        self.start_timeout = start_timeout
        self.adopt_timeout = adopt_timeout
        self.stop_grace = stop_grace
        self.touch_interval = touch_interval
        self._by_user: dict[int, Sandbox] = {}
        self._starting: dict[int, asyncio.Task[Sandbox]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._touched: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    # -- gateway lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Take over from the previous gateway: adopt what still answers, clean up the rest."""
        for directory in (self.sandboxes_dir, self.workspaces_dir):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o711)
        async with self.pool.connection() as conn:
            rows = await store.live_sandboxes(conn, self.backend.name)
        containers = {c.id: c for c in await self.backend.list()}
        row_ids = {row["id"] for row in rows}
        outcomes = await asyncio.gather(*(self._recover(row, containers.get(row["id"])) for row in rows))
        kept = {sandbox.id for sandbox in outcomes if sandbox is not None}
        kept |= {row["id"] for row in rows if row["state"] == State.HIBERNATED}
        for sandbox_id in containers.keys() - row_ids:
            log.info("destroying sandbox %s: it has no live row", sandbox_id)
            await self.backend.destroy(sandbox_id)
        kill_strays = getattr(self.backend, "kill_strays", None)
        if kill_strays is not None and (killed := kill_strays(kept)):
            log.warning("killed %d stray runsc processes", killed)
        for directory in self.sandboxes_dir.iterdir():
            if directory.name not in kept:
                shutil.rmtree(directory, ignore_errors=True)
        self._flusher = asyncio.create_task(self._flush_touches_periodically())
        log.info("sandboxes: %d adopted, %d cleaned up", len(kept), len(rows) - len(kept))

    async def _recover(self, row: dict[str, Any], container: Any) -> Sandbox | None:
        sandbox_id = row["id"]
        if row["state"] == State.HIBERNATED:
            return None  # nothing runs; its checkpoint stays for a resume
        if container is None:
            await self._set_state(sandbox_id, State.FAILED, "its container was gone when the gateway started")
            return None
        if container.status == "running":
            adopted = await self._adopt(row)
            if isinstance(adopted, Sandbox):
                return adopted
            reason = adopted
        else:
            reason = f"its container was {container.status} when the gateway started"
        await self.backend.destroy(sandbox_id)
        await self._set_state(sandbox_id, State.FAILED, reason)
        return None

    async def _adopt(self, row: dict[str, Any]) -> Sandbox | str:
        """The running sandbox of `row` if its supervisor answers, else why not."""
        directory = self.sandboxes_dir / row["id"]
        try:
            token = (directory / TOKEN_FILE).read_text()
        except OSError as exc:
            return f"its supervisor's token is unreadable ({exc.strerror})"
        client = self._client(directory, token)
        try:
            await client.listen()
            await client.wait_ready(self.adopt_timeout)
            await self.backend.settle(row["id"])  # the previous gateway may have died before it could
        except (SandboxUnavailable, OSError) as exc:
            await client.close()
            return f"its supervisor did not answer after a gateway restart ({exc})"
        sandbox = Sandbox(
            id=row["id"],
            user_id=row["user_id"],
            tenant=row["tenant"],
            user=row["user"],
            client=client,
            directory=directory,
            workspace=self._workspace(row["user_id"]),
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )
        self._by_user[sandbox.user_id] = sandbox
        if row["state"] != State.RUNNING:
            await self._set_state(sandbox.id, State.RUNNING)
        log.info("adopted sandbox %s of %s/%s", sandbox.id, sandbox.tenant, sandbox.user)
        return sandbox

    async def close(self) -> None:
        """Graceful gateway stop: every sandbox is stopped and its row Reclaimed; workspaces stay."""
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        await self._flush_touches()
        sandboxes = list(self._by_user.values())
        await asyncio.gather(
            *(self._retire(s, State.RECLAIMED, "the gateway stopped", graceful=True) for s in sandboxes)
        )

    # -- per user -------------------------------------------------------------------------

    async def ensure(self, user_id: int, tenant: str, user: str) -> Sandbox:
        """The user's running sandbox, started (and waited for) if need be."""
        sandbox = self._by_user.get(user_id)
        if sandbox is not None and sandbox.client.connected:
            self._touch(sandbox)
            return sandbox
        if self._closing:
            raise SandboxUnavailable("the gateway is stopping")
        async with self._lock(user_id):
            sandbox = self._by_user.get(user_id)
            if sandbox is not None:
                if sandbox.client.connected:
                    self._touch(sandbox)
                    return sandbox
                reason = await self._why_disconnected(sandbox)
                if reason is None:
                    self._touch(sandbox)
                    return sandbox
                log.warning("sandbox %s of %s/%s is gone: %s", sandbox.id, tenant, user, reason)
                await self._retire(sandbox, State.FAILED, reason)
            task = self._starting.get(user_id)
            if task is None:
                task = asyncio.create_task(self._start_sandbox(user_id, tenant, user))
                self._starting[user_id] = task
                task.add_done_callback(lambda _: self._starting.pop(user_id, None))
        # Shielded: a caller that gives up does not abort a start others may be waiting for.
        return await asyncio.shield(task)

    async def _why_disconnected(self, sandbox: Sandbox) -> str | None:
        """None if the channel came back, else why the sandbox counts as dead."""
        if not await self.backend.is_alive(sandbox.id):
            # Not the console's tail: servers' stderr may hold what must not reach the database.
            return "it stopped unexpectedly (killed from outside, out of memory, or its supervisor exited)"
        try:
            await sandbox.client.wait_ready(self.adopt_timeout)
        except SandboxUnavailable:
            return "it runs, but its supervisor stopped answering"
        return None

    async def reclaim(self, user_id: int, reason: str = "reclaimed") -> bool:
        """Stop the user's sandbox and mark it Reclaimed (the workspace stays); False if there was none."""
        async with self._lock(user_id):
            task = self._starting.get(user_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            sandbox = self._by_user.get(user_id)
            if sandbox is not None:
                await self._retire(sandbox, State.RECLAIMED, reason, graceful=True)
                return True
            async with self.pool.connection() as conn:
                rows = [r for r in await store.live_sandboxes(conn, self.backend.name) if r["user_id"] == user_id]
                for row in rows:
                    await self.backend.destroy(row["id"])
                    await store.set_state(conn, row["id"], State.RECLAIMED, reason)
            return bool(rows)

    async def list(self, *, include_ended: bool = False) -> list[dict[str, Any]]:
        """Rows of the sandboxes (live ones unless `include_ended`): id, user, tenant, state, times, reason."""
        await self._flush_touches()
        async with self.pool.connection() as conn:
            return await store.list_sandboxes(conn, include_ended=include_ended)

    def get(self, user_id: int) -> Sandbox | None:
        return self._by_user.get(user_id)

    # -- starting and stopping ------------------------------------------------------------

    async def _start_sandbox(self, user_id: int, tenant: str, user: str) -> Sandbox:
        sandbox_id = f"sbx-{secrets.token_hex(6)}"
        directory = self.sandboxes_dir / sandbox_id
        channel = directory / "channel"
        try:
            async with self.pool.connection() as conn:
                row = await store.insert(conn, sandbox_id, user_id, self.backend.name, State.PENDING)
        except psycopg.errors.UniqueViolation:
            raise SandboxUnavailable(
                f"{tenant}/{user} already has a live sandbox that this gateway does not manage"
            ) from None
        except psycopg.Error as exc:
            raise SandboxUnavailable(f"the sandbox database is unavailable ({type(exc).__name__})") from exc
        token = secrets.token_urlsafe(32)
        client = self._client(directory, token)
        started = time.monotonic()
        try:
            workspace = self._prepare(directory, channel, user_id, token)
            await client.listen()
            await self._set_state(sandbox_id, State.STARTING)
            spec = SandboxSpec(
                id=sandbox_id,
                directory=directory,
                workspace=workspace,
                channel=channel,
                limits=self.limits,
                uid=self.uid,
                gid=self.gid,
            )
            await self.backend.start(spec)
            await client.wait_ready(self.start_timeout)
            await self.backend.settle(sandbox_id)
            await self._set_state(sandbox_id, State.RUNNING)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "its start was cancelled" if cancelled else f"it did not start: {exc}"
            await asyncio.shield(self._abandon(sandbox_id, client, directory, reason))
            if isinstance(exc, SandboxUnavailable | asyncio.CancelledError):
                raise
            raise SandboxUnavailable(reason) from exc
        sandbox = Sandbox(
            id=sandbox_id,
            user_id=user_id,
            tenant=tenant,
            user=user,
            client=client,
            directory=directory,
            workspace=workspace,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )
        self._by_user[user_id] = sandbox
        failed = [f"{name}: {s.get('error')}" for name, s in client.servers.items() if s.get("state") != "ready"]
        log.info(
            "sandbox %s of %s/%s running after %.1fs%s",
            sandbox_id,
            tenant,
            user,
            time.monotonic() - started,
            f" (servers not ready: {'; '.join(failed)})" if failed else "",
        )
        return sandbox

    async def _abandon(self, sandbox_id: str, client: SupervisorClient, directory: Path, reason: str) -> None:
        await client.close()
        await self.backend.destroy(sandbox_id)
        _drop_runtime_files(directory)
        await self._set_state(sandbox_id, State.FAILED, reason)

    async def _retire(self, sandbox: Sandbox, state: State, reason: str, *, graceful: bool = False) -> None:
        if self._by_user.get(sandbox.user_id) is sandbox:
            del self._by_user[sandbox.user_id]
        self._touched.discard(sandbox.id)
        await sandbox.client.close()
        await self.backend.destroy(sandbox.id, grace=self.stop_grace if graceful else 0.0)
        if state == State.RECLAIMED:
            shutil.rmtree(sandbox.directory, ignore_errors=True)
        else:
            _drop_runtime_files(sandbox.directory)  # the logs stay to explain the failure
        await self._set_state(sandbox.id, state, reason)

    def _prepare(self, directory: Path, channel: Path, user_id: int, token: str) -> Path:
        directory.mkdir(mode=0o711)
        # Outside the channel dir, so out of the sandbox's sight; a successor gateway reads it.
        fd = os.open(directory / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        channel.mkdir(mode=0o700)
        os.chown(channel, self.uid, self.gid)
        workspace = self._workspace(user_id)
        if not workspace.exists():
            workspace.mkdir(mode=0o700)
            os.chown(workspace, self.uid, self.gid)
        config = SupervisorConfig(
            socket=f"{wire.CHANNEL_DIR}/{wire.SOCKET_NAME}",
            servers=[ServerConfig(name=s.name, argv=list(s.argv), env=dict(s.env)) for s in self.servers],
            token=token,
        )
        config.write(channel / wire.CONFIG_NAME, owner=(self.uid, self.gid))
        return workspace

    def _workspace(self, user_id: int) -> Path:
        return self.workspaces_dir / str(user_id)

    def _client(self, directory: Path, token: str) -> SupervisorClient:
        return SupervisorClient(
            directory / "channel" / wire.SOCKET_NAME, token=token, socket_owner=(self.uid, self.gid)
        )

    def _lock(self, user_id: int) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    async def _set_state(self, sandbox_id: str, state: State, reason: str | None = None) -> None:
        async with self.pool.connection() as conn:
            await store.set_state(conn, sandbox_id, state, reason)

    # -- last use -------------------------------------------------------------------------

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


def _drop_runtime_files(directory: Path) -> None:
    for name in ("bundle", "channel"):
        shutil.rmtree(directory / name, ignore_errors=True)

