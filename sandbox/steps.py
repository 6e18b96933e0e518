"""The steps of one sandbox's life, each recorded in its row before it is taken: start, checkpoint
and put away (hibernation), resume, adopt (after a gateway restart), stop.

A step touches one sandbox only, and never the manager's bookkeeping of which sandboxes run
(`sandbox.running`): the manager takes steps under the user's lock and keeps the books itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import psycopg

from core.tasks import Tasks
from sandbox import wire
from sandbox.backends.base import Freezing, SandboxBackend, SandboxSpec
from sandbox.boot import START_BOOST_S, boot, prepare, wait_ready
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.layout import SandboxLayout, drop_channel, forget, make_channel, read_token, tree_bytes
from sandbox.model_asks import ModelGate
from sandbox.running import Sandbox
from sandbox.servers import ServerSource, without_secrets
from sandbox.span_relay import SpanSink
from sandbox.state import StateRecorder
from sandbox.store import State
from sandbox.tiers import Tier
from sandbox.tunnels import EgressPolicy
from sandbox.workspaces import WorkspaceInUse, Workspaces

log = logging.getLogger(__name__)

RELEASE_WAIT_S = 15.0
"""How long a resume waits for its workspace to be let go by the mount namespaces still holding it."""


class ImageSealer(Protocol):
    """Encrypts a checkpoint image in place after it is written, and decrypts it before a restore
    (core.sealed_images). Blocking: called in a thread."""

    def seal(self, directory: Path) -> None: ...

    def unseal(self, directory: Path) -> None: ...


class Steps:
    def __init__(
        self,
        home: Path,
        backend: SandboxBackend,
        workspaces: Workspaces,
        servers: ServerSource,
        states: StateRecorder,
        *,
        uid: int,
        gid: int,
        start_timeout: float = 120.0,
        start_boost_s: float = START_BOOST_S,
        adopt_timeout: float = 5.0,
        stop_grace: float = 3.0,
        drain_timeout: float = 30.0,
        max_result_bytes: int = wire.MAX_LINE,
        egress: EgressPolicy | None = None,
        models: ModelGate | None = None,
        spans: SpanSink | None = None,
        images: ImageSealer | None = None,
        quick_resume: bool = True,
    ):
        """`quick_resume` (off only to measure against): a resume unseals while it mounts, and
        deletes the used image after it returned."""
        self.home = home
        self.quick_resume = quick_resume
        self.background = Tasks()
        """Work left after a step returned (deleting a used image)."""
        self.images = images
        self.backend = backend
        self.workspaces = workspaces
        self.servers = servers
        self.states = states
        self.uid, self.gid = uid, gid
        self.start_timeout = start_timeout
        self.start_boost_s = start_boost_s
        self.adopt_timeout = adopt_timeout
        self.stop_grace = stop_grace
        self.drain_timeout = drain_timeout
        self.max_result_bytes = max_result_bytes
        self.egress = egress
        self.models = models
        self.spans = spans

    def layout(self, sandbox_id: str) -> SandboxLayout:
        return SandboxLayout(self.home, sandbox_id)

    def client(self, layout: SandboxLayout, token: str) -> SupervisorClient:
        client = SupervisorClient(
            layout.socket, token=token, socket_owner=(self.uid, self.gid), max_result_bytes=self.max_result_bytes,
            egress=self.egress, models=self.models, spans=self.spans,
        )
        if isinstance(self.backend, Freezing):  # a frozen sandbox is thawed before anything is sent to it
            client.wake = functools.partial(self.backend.thaw, layout.sandbox_id)
        return client

    def spec(self, sandbox: Sandbox) -> SandboxSpec:
        return SandboxSpec(
            id=sandbox.id,
            directory=sandbox.layout.dir,
            workspace=sandbox.layout.workspace,
            channel=sandbox.layout.channel,
            limits=sandbox.tier.limits,
            uid=self.uid,
            gid=self.gid,
        )

    # -- start ----------------------------------------------------------------------------

    async def start(self, user_id: int | None, tenant: str | None, user: str | None, tier: Tier) -> Sandbox:
        """A fresh sandbox, running the servers the user may run (a warm one: nobody's, no user)."""
        sandbox_id, row = await self.new_row(user_id, tenant, user, tier)
        layout = self.layout(sandbox_id)
        token = secrets.token_urlsafe(32)
        # Servers holding secrets are not in the config file on disk: the first `ensure` configures them over the channel.
        servers = without_secrets(await self.servers.servers_for(user_id))
        sandbox = Sandbox(
            id=sandbox_id,
            user_id=user_id,
            tenant=tenant,
            user=user,
            tier=tier,
            client=self.client(layout, token),
            layout=layout,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
            servers=servers,
        )
        started = time.monotonic()
        try:
            await asyncio.to_thread(
                prepare, layout, token, servers,
                mount_workspace=lambda _: self.mount_workspace(sandbox),
                provision=lambda tools: self.servers.provision(tools, servers),
                uid=self.uid, gid=self.gid, traces=self.spans is not None,
                # A warm sandbox starts its servers now: it is there to answer its claimant's first call at once.
                start="boot" if user_id is None else None,
            )  # fmt: skip
            await self.states.set(sandbox_id, State.STARTING, user_id=user_id)
            await boot(self.backend, self.spec(sandbox), sandbox.client, self.start_timeout, self.start_boost_s)
            await self.states.set(sandbox_id, State.RUNNING, user_id=user_id)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "its start was cancelled" if cancelled else f"it did not start: {exc}"
            await asyncio.shield(self.abandon(sandbox, reason))
            if isinstance(exc, SandboxUnavailable | asyncio.CancelledError):
                raise
            raise SandboxUnavailable(reason) from exc
        failed = [f"{name}: {s.get('error')}" for name, s in sandbox.client.servers.items() if s.get("state") not in ("ready", "idle")]
        log.info(
            "sandbox %s %s running after %.1fs%s",
            sandbox_id,
            f"of {tenant}/{user}" if user_id is not None else "(warm pool)",
            time.monotonic() - started,
            f" (servers not ready: {'; '.join(failed)})" if failed else "",
        )
        return sandbox

    async def new_row(self, user_id: int | None, tenant: str | None, user: str | None, tier: Tier) -> tuple[str, dict[str, Any]]:
        """A new sandbox's id and its row (Pending); SandboxUnavailable if the user has a live one."""
        sandbox_id = f"sbx-{secrets.token_hex(6)}"
        try:
            return sandbox_id, await self.states.insert(sandbox_id, user_id, self.backend.name, tier.name)
        except psycopg.errors.UniqueViolation:
            raise SandboxUnavailable(
                f"{tenant}/{user} already has a live sandbox that this gateway does not manage"
            ) from None
        except psycopg.Error as exc:
            raise SandboxUnavailable(f"the sandbox database is unavailable ({type(exc).__name__})") from exc

    def mount_workspace(self, sandbox: Sandbox) -> None:
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

    # -- hibernate ------------------------------------------------------------------------

    async def checkpoint(self, sandbox: Sandbox, reason: str) -> bool:
        """Drain calls, detach the channel and save the sandbox (it stops); `put_away` it next.
        False if it could not be saved but runs on (Running again); SandboxUnavailable if it is lost."""
        sandbox.state = State.HIBERNATING  # new calls now wait for the user's lock, then resume it
        await self.states.set(sandbox.id, State.HIBERNATING, reason, user_id=sandbox.user_id)
        layout = sandbox.layout
        try:
            await self._drain(sandbox)
            await sandbox.client.detach()
            shutil.rmtree(layout.checkpoint_partial, ignore_errors=True)
            await self.backend.checkpoint(sandbox.id, layout.checkpoint_partial)
            if self.images is not None:
                await self._seal(layout.checkpoint_partial)
            # Complete only once renamed: recovery tells a finished checkpoint by its name.
            shutil.rmtree(layout.checkpoint, ignore_errors=True)
            os.rename(layout.checkpoint_partial, layout.checkpoint)
        except SandboxUnavailable as exc:
            if await self._runs_on(sandbox, exc):
                return False
            raise SandboxUnavailable(f"hibernation failed: {exc}") from exc
        return True

    async def _seal(self, image: Path) -> None:
        assert self.images is not None
        try:
            await asyncio.to_thread(self.images.seal, image)
        except Exception as exc:  # the sandbox is stopped already: its memory must not stay on disk in the clear
            shutil.rmtree(image, ignore_errors=True)
            raise SandboxUnavailable(f"its checkpoint could not be encrypted: {exc}") from exc

    async def _drain(self, sandbox: Sandbox) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while sandbox.client.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if sandbox.client.in_flight:
            raise SandboxUnavailable(f"{sandbox.client.in_flight} calls still running after {self.drain_timeout:.0f}s")

    async def _runs_on(self, sandbox: Sandbox, exc: Exception) -> bool:
        """After a failed checkpoint: whether the sandbox still runs and its supervisor came back."""
        shutil.rmtree(sandbox.layout.checkpoint_partial, ignore_errors=True)
        if not await self.backend.is_alive(sandbox.id):
            return False
        with contextlib.suppress(SandboxUnavailable):
            await sandbox.client.listen()  # the supervisor keeps trying to connect
            await sandbox.client.wait_ready(self.adopt_timeout)
        if not sandbox.client.connected:
            return False
        sandbox.state = State.RUNNING
        await self.states.set(sandbox.id, State.RUNNING, f"hibernation failed: {exc}", user_id=sandbox.user_id)
        log.warning("sandbox %s stays running: hibernation failed: %s", sandbox.id, exc)
        return True

    async def put_away(self, sandbox: Sandbox, reason: str, started: float) -> None:
        """After a checkpoint: nothing of the sandbox stays mounted, its row says Hibernated."""
        await sandbox.client.close()
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        drop_channel(sandbox.layout)
        size = tree_bytes(sandbox.layout.checkpoint)
        await self.states.set(sandbox.id, State.HIBERNATED, reason, user_id=sandbox.user_id, checkpoint_bytes=size)
        log.info(
            "sandbox %s of %s/%s hibernated in %.2fs (%.0f MiB): %s",
            sandbox.id, sandbox.tenant, sandbox.user, time.perf_counter() - started, size / 2**20, reason,
        )  # fmt: skip

    # -- resume, adopt --------------------------------------------------------------------

    async def resume(self, row: dict[str, Any], tier: Tier) -> Sandbox | None:
        """Restore a Hibernated sandbox from its checkpoint; None if that failed (the row says why
        and is Failed; what was in memory is lost, the workspace is not)."""
        user_id, tenant, user = row["user_id"], row["tenant"], row["user"]
        layout = self.layout(row["id"])
        started = time.perf_counter()
        try:
            token = read_token(layout)
        except OSError as exc:
            await self.states.set(row["id"], State.FAILED, f"its token is unreadable ({exc.strerror})", user_id=user_id)
            return None
        sandbox = Sandbox(
            id=row["id"],
            user_id=user_id,
            tenant=tenant,
            user=user,
            tier=tier,  # a restored sandbox keeps the CPU/memory limits of its bundle until its next fresh start
            client=self.client(layout, token),
            layout=layout,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )
        phases = sandbox.resume_phases
        try:
            with phases.timed("row"):
                await self.states.set(sandbox.id, State.RESUMING, user_id=user_id)
            with phases.timed("mount, unseal"):
                await self._before_restore(sandbox)
            with phases.timed("restore"):
                await self.backend.restore(self.spec(sandbox), layout.checkpoint)
            with phases.timed("reconnect"):
                await wait_ready(self.backend, sandbox.client, sandbox.id, self.start_timeout, self.start_boost_s)
            with phases.timed("row"):
                await self.states.set(sandbox.id, State.RUNNING, "resumed", user_id=user_id)
        except BaseException as exc:
            reason = "its resume was cancelled" if isinstance(exc, asyncio.CancelledError) else f"its resume failed: {exc}"
            await asyncio.shield(self.abandon(sandbox, reason))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("sandbox %s of %s/%s: %s; starting a fresh one", sandbox.id, tenant, user, reason)
            return None
        with phases.timed("drop image"):
            self._drop_image(layout)
        log.info("sandbox %s of %s/%s resumed in %.2fs (%s)", sandbox.id, tenant, user, time.perf_counter() - started, phases)
        return sandbox

    async def _before_restore(self, sandbox: Sandbox) -> None:
        """The workspace mounted, the channel listening and the image unsealed; the mount and the
        unseal (both blocking, in threads) side by side unless `quick_resume` is off."""
        layout = sandbox.layout

        async def mount() -> None:
            deadline = time.monotonic() + RELEASE_WAIT_S
            waited: WorkspaceInUse | None = None
            while True:
                try:
                    await asyncio.to_thread(self.mount_workspace, sandbox)
                    break
                except WorkspaceInUse as exc:
                    if waited is None:
                        waited = exc
                        log.info("the resume of sandbox %s waits for its workspace: %s", sandbox.id, exc)
                    # Its loop device is still mounted in another mount namespace: most likely its
                    # own last gofer's, still exiting, which lets go within seconds on a loaded host:
                    # wait, do not fail. (The copies that other runsc gofers and sandboxes make while
                    # it is mounted go with its unmount here: the sandboxes dir is a shared mount,
                    # `sandbox.mounts.share`; only where it could not be made do they hold it too,
                    # until they have pivoted into their own roots.)
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            make_channel(layout, self.uid, self.gid)
            await sandbox.client.listen()

        if self.images is None:
            await mount()
        elif not self.quick_resume:
            await mount()
            await asyncio.to_thread(self.images.unseal, layout.checkpoint)
        else:
            # Both run to their end before a failure is raised: abandon() then undoes all of it.
            done = await asyncio.gather(mount(), asyncio.to_thread(self.images.unseal, layout.checkpoint), return_exceptions=True)
            for outcome in done:
                if isinstance(outcome, BaseException):
                    raise outcome

    def _drop_image(self, layout: SandboxLayout) -> None:
        """The image is used up: renamed out of the way (the next hibernation writes a new one) and
        deleted in a thread, off the resume's path; unless `quick_resume` is off, deleted here."""
        if not self.quick_resume:
            shutil.rmtree(layout.checkpoint, ignore_errors=True)
            return
        shutil.rmtree(layout.checkpoint_spent, ignore_errors=True)
        try:
            os.rename(layout.checkpoint, layout.checkpoint_spent)
        except OSError:
            shutil.rmtree(layout.checkpoint, ignore_errors=True)
            return
        self.background.spawn(asyncio.to_thread(shutil.rmtree, layout.checkpoint_spent, ignore_errors=True))

    async def adopt(self, row: dict[str, Any], tier: Tier) -> Sandbox | str:
        """The running sandbox of `row` (left by a previous gateway) if its supervisor answers, else why not."""
        layout = self.layout(row["id"])
        try:
            token = read_token(layout)
        except OSError as exc:
            return f"its supervisor's token is unreadable ({exc.strerror})"
        client = self.client(layout, token)
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
            tier=tier,
            client=client,
            layout=layout,
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )
        if row["state"] != State.RUNNING:
            await self.states.set(sandbox.id, State.RUNNING, "adopted after a gateway restart", user_id=row["user_id"])
        log.info("adopted sandbox %s of %s/%s", sandbox.id, sandbox.tenant, sandbox.user)
        return sandbox

    async def why_not_usable(self, sandbox: Sandbox) -> str | None:
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

    # -- stop -----------------------------------------------------------------------------

    async def stop(self, sandbox: Sandbox, state: State, reason: str, *, graceful: bool = False) -> None:
        """Stop a running sandbox for good (Reclaimed or Failed); a pooled workspace goes with it."""
        sandbox.state = state
        await sandbox.client.close()
        await self.backend.destroy(sandbox.id, grace=self.stop_grace if graceful else 0.0)
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        # A failed sandbox keeps its logs to explain the failure.
        forget(sandbox.layout, self.workspaces, keep_logs=state != State.RECLAIMED)
        await self.states.set(sandbox.id, state, reason, user_id=sandbox.user_id)
        if sandbox.user_id is None:
            self.workspaces.delete(sandbox.workspace_key)  # a pooled workspace was nobody's

    async def abandon(self, sandbox: Sandbox, reason: str) -> None:
        """A start or resume that failed: whatever it got to is undone, the row is Failed (also when
        the backend cannot destroy what it started: the row must not stay Starting or Resuming)."""
        await sandbox.client.close()
        try:
            await self.backend.destroy(sandbox.id)
        except SandboxUnavailable as exc:
            log.warning("sandbox %s: what its failed start or resume left could not be destroyed: %s", sandbox.id, exc)
        await asyncio.to_thread(self.workspaces.unmount, sandbox.workspace)
        if sandbox.user_id is None:
            self.workspaces.delete(sandbox.workspace_key)
        forget(sandbox.layout, self.workspaces, keep_logs=True)
        await self.states.set(sandbox.id, State.FAILED, reason, user_id=sandbox.user_id)

    async def reclaim_row(self, row: dict[str, Any], reason: str) -> None:
        """Reclaim what a row names that does not run here (a hibernated sandbox: its checkpoint goes)."""
        await self.backend.destroy(row["id"])
        forget(self.layout(row["id"]), self.workspaces, keep_logs=False)
        await self.states.set(row["id"], State.RECLAIMED, reason, user_id=row["user_id"])
