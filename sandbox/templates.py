"""Sandboxes cloned from a template's checkpoint: a cold start that restores instead of booting.

A cold start boots gVisor, then the supervisor's Python, which imports its modules under gVisor:
seconds on a loaded node. A template is one sandbox of a tier booted once for nobody, with no
servers, and checkpointed; a new sandbox of that tier is then a restore of that image under an id,
bundle, cgroup, channel and workspace of its own (`Cloning.clone`). What gVisor restores is the
template's memory; its mounts are the clone's: the servers, which start on first use, see only the
clone's workspace and tools (tested).

What a clone inherits from the template, and why that is safe:
- the supervisor's token, and what it did at its start. The supervisor's first hello carries the
  template's token; the gateway's first message is `cloned`, with a token of the clone's own, on
  which the supervisor also shares the clone's workspace with its servers' group as it did the
  template's. The clone is used only once that is done (the token on disk, for a successor
  gateway, is the clone's from the start).
- the supervisor's hash seed and its Python's state. The supervisor draws its randomness from
  `os.urandom` (`secrets`), which gVisor serves from the host's; servers are started after the
  restore, each with seeds of its own.

One template per tier (its limits are in the image), built in the background: at the gateway's
start for the default tier, and for another tier at its first cold start, which boots as before.
A clone that fails drops its template (the next cold start of the tier builds a new one) and the
user gets a booted sandbox instead. Templates live beside the sandboxes and go with the gateway:
the next one builds its own, from its own code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from core.tasks import Tasks
from sandbox.backends.base import Cloning, SandboxSpec
from sandbox.boot import boot, prepare, wait_ready
from sandbox.errors import SandboxUnavailable
from sandbox.layout import SandboxLayout, drop_channel, forget, make_channel, write_token
from sandbox.running import Sandbox
from sandbox.servers import ServerSpec, fork_modules, without_secrets
from sandbox.steps import Steps
from sandbox.store import State
from sandbox.tiers import Tier

log = logging.getLogger(__name__)

TEMPLATE_PREFIX = "tpl-"
MAX_FAILURES = 3
"""Templates of a tier that failed (to build, or to clone) before the tier boots its sandboxes for good."""


@dataclass(frozen=True)
class Template:
    tier: Tier
    layout: SandboxLayout
    token: str
    """The token in the template's memory, which each clone's first hello carries."""

    @property
    def image(self) -> Path:
        return self.layout.checkpoint


class Templates:
    def __init__(self, steps: Steps):
        if not isinstance(steps.backend, Cloning):
            raise TypeError(f"the {steps.backend.name} backend cannot clone sandboxes")
        self.steps = steps
        self.backend: Cloning = steps.backend
        self._ready: dict[Tier, Template] = {}
        self._building: dict[Tier, asyncio.Task[None]] = {}
        self._failures: dict[Tier, int] = {}
        self._tasks = Tasks()

    def template(self, tier: Tier) -> Template | None:
        return self._ready.get(tier)

    def prepare(self, tier: Tier) -> None:
        """Build the tier's template in the background, unless there is one or one is being built."""
        if tier in self._ready or tier in self._building or self._failures.get(tier, 0) >= MAX_FAILURES:
            return
        task = self._tasks.spawn(self._build(tier), name=f"sandbox template of tier {tier.name}")
        self._building[tier] = task
        task.add_done_callback(lambda _: self._building.pop(tier, None))

    async def wait(self, tier: Tier) -> bool:
        """Wait for a template build under way; whether the tier has a template now."""
        task = self._building.get(tier)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return tier in self._ready

    async def _build(self, tier: Tier) -> None:
        steps = self.steps
        layout = steps.layout(f"{TEMPLATE_PREFIX}{secrets.token_hex(6)}")
        token = secrets.token_urlsafe(32)
        client = steps.client(layout, token)
        spec = SandboxSpec(
            id=layout.sandbox_id, directory=layout.dir, workspace=layout.workspace, channel=layout.channel,
            limits=tier.limits, uid=steps.uid, gid=steps.gid,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            await asyncio.to_thread(
                prepare, layout, token, (),
                mount_workspace=functools.partial(self._empty_workspace, tier),
                provision=lambda tools: steps.servers.provision(tools, ()),
                uid=steps.uid, gid=steps.gid, traces=steps.spans is not None,
            )  # fmt: skip
            await boot(steps.backend, spec, client, steps.start_timeout, steps.start_boost_s)
            # Its fork server imported, as far as the servers of nobody's sandbox go: a clone's first
            # call forks its server at once, where a booted sandbox's first call waits for the imports.
            defaults = await steps.servers.servers_for(None)
            await client.warm([m for m in fork_modules() if any(m in s.argv for s in defaults)], steps.start_timeout)
            await client.detach()
            await steps.backend.checkpoint(layout.sandbox_id, layout.checkpoint)
        except BaseException as exc:
            self._failures[tier] = self._failures.get(tier, 0) + 1
            await asyncio.shield(self._remove(layout))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("could not build a sandbox template of tier %s: %s", tier.name, exc)
            return
        finally:
            await client.close()
            drop_channel(layout)
        await steps.backend.destroy(layout.sandbox_id)  # what runsc keeps of it after the checkpoint
        self._ready[tier] = Template(tier, layout, token)
        log.info("sandbox template %s of tier %s ready in %.2fs", layout.sandbox_id, tier.name, time.perf_counter() - started)

    def _empty_workspace(self, tier: Tier, path: Path) -> None:
        """Nobody's, and fresh: made as a user's is, since gVisor keeps what it knew of the mount's
        root (owner, mode) in the image, and a clone's servers see that over their user's workspace."""
        key = path.parent.name  # the template's id
        self.steps.workspaces.create(key, tier.disk_bytes)
        self.steps.workspaces.mount(key, path)

    async def _remove(self, layout: SandboxLayout) -> None:
        try:
            await self.steps.backend.destroy(layout.sandbox_id)
        except SandboxUnavailable as exc:
            log.warning("sandbox template %s could not be destroyed: %s", layout.sandbox_id, exc)
        await asyncio.to_thread(forget, layout, self.steps.workspaces, keep_logs=False)
        await asyncio.to_thread(self.steps.workspaces.delete, layout.sandbox_id)

    async def clone(self, user_id: int | None, tenant: str | None, user: str | None, tier: Tier) -> Sandbox | None:
        """A new sandbox of the user's from the tier's template, running no server yet (the first
        `ensure` configures them); None if the tier has no template (one is built for the next
        time) or the clone failed (its row says why, and the template goes)."""
        template = self._ready.get(tier)
        if template is None:
            self.prepare(tier)
            return None
        try:
            return await self._clone(template, user_id, tenant, user)
        except SandboxUnavailable as exc:
            log.warning("sandbox of %s/%s could not be cloned from template %s: %s; it boots instead",
                        tenant, user, template.layout.sandbox_id, exc)
            self._failures[tier] = self._failures.get(tier, 0) + 1
            if self._ready.get(tier) is template:
                del self._ready[tier]
                self._tasks.spawn(self._remove(template.layout))
            return None

    async def _clone(self, template: Template, user_id: int | None, tenant: str | None, user: str | None) -> Sandbox:
        steps, tier = self.steps, template.tier
        sandbox_id, row = await steps.new_row(user_id, tenant, user, tier)
        layout = steps.layout(sandbox_id)
        token = secrets.token_urlsafe(32)
        sandbox = Sandbox(
            id=sandbox_id, user_id=user_id, tenant=tenant, user=user, tier=tier,
            client=steps.client(layout, template.token), layout=layout,
            created_at=row["created_at"], last_used_at=row["last_used_at"], servers=(),
        )  # fmt: skip
        started = time.perf_counter()
        try:
            servers = without_secrets(await steps.servers.servers_for(user_id))
            await asyncio.to_thread(self._lay_out, sandbox, token, servers)
            await steps.states.set(sandbox_id, State.STARTING, f"cloned from template {template.layout.sandbox_id}", user_id=user_id)
            await sandbox.client.listen()
            await self.backend.clone(steps.spec(sandbox), template.image)
            await wait_ready(steps.backend, sandbox.client, sandbox_id, steps.start_timeout, steps.start_boost_s)
            await sandbox.client.cloned(token)
            await steps.states.set(sandbox_id, State.RUNNING, user_id=user_id)
        except BaseException as exc:
            reason = "its start was cancelled" if isinstance(exc, asyncio.CancelledError) else f"its clone did not start: {exc}"
            await asyncio.shield(steps.abandon(sandbox, reason))
            if isinstance(exc, SandboxUnavailable | asyncio.CancelledError):
                raise
            raise SandboxUnavailable(reason) from exc
        log.info("sandbox %s %s cloned from %s in %.2fs", sandbox_id,
                 f"of {tenant}/{user}" if user_id is not None else "(warm pool)", template.layout.sandbox_id, time.perf_counter() - started)
        return sandbox

    def _lay_out(self, sandbox: Sandbox, token: str, servers: tuple[ServerSpec, ...]) -> None:
        """The clone's dir as a cold start's (`boot.prepare`), less the supervisor's config: the
        supervisor in the image has the template's, and its servers come over the channel."""
        layout = sandbox.layout
        layout.dir.parent.mkdir(parents=True, exist_ok=True)
        layout.dir.mkdir(mode=0o711)
        write_token(layout, token)
        make_channel(layout, self.steps.uid, self.steps.gid)
        self.steps.mount_workspace(sandbox)
        self.steps.servers.provision(layout.tools, servers)

    async def stop(self) -> None:
        """Stop the builds under way: the gateway is stopping."""
        await self._tasks.close()

    async def close(self) -> None:
        """Stop building and remove every template."""
        await self.stop()
        ready, self._ready = list(self._ready.values()), {}
        await asyncio.gather(*(self._remove(t.layout) for t in ready))
