"""The sandboxes this gateway runs: each as the manager holds it (`Sandbox`), and all of them by id,
by user and in the warm pool (`Running`). Only the manager changes `Running`, under the user's lock."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sandbox.client import SupervisorClient
from sandbox.layout import SandboxLayout
from sandbox.servers import ServerSpec
from sandbox.store import State
from sandbox.tiers import Tier


class Phases(dict[str, float]):
    """Milliseconds spent in each named phase of a step (a resume's restore, reconnect...), for the
    log and the lifecycle bench; a phase timed twice adds up."""

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + (time.perf_counter() - started) * 1e3

    def __str__(self) -> str:
        return ", ".join(f"{name} {ms:.0f} ms" for name, ms in self.items())


@dataclass
class Sandbox:
    id: str
    user_id: int | None
    """None while it waits in the warm pool."""
    tenant: str | None
    user: str | None
    tier: Tier
    client: SupervisorClient
    layout: SandboxLayout
    created_at: datetime
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    state: State = State.RUNNING
    servers: tuple[ServerSpec, ...] | None = None
    """What its supervisor was last told to run; None when unknown (resumed or adopted)."""
    resume_phases: Phases = field(default_factory=Phases)
    """Where its last resume's time went (empty if it was started, not resumed)."""

    def __post_init__(self) -> None:
        # The channel's egress tunnels are decided by who the sandbox is for and what it runs now.
        if self.client.tunnels is not None:
            self.client.tunnels.sandbox = self
        self.client.model_asks.sandbox = self
        self.client.spans.sandbox = self

    @property
    def directory(self) -> Path:
        return self.layout.dir

    @property
    def workspace(self) -> Path:
        """The user's workspace as mounted on the host while the sandbox lives."""
        return self.layout.workspace

    @property
    def workspace_key(self) -> str:
        return workspace_key(self.user_id, self.id)


def workspace_key(user_id: int | None, sandbox_id: str) -> str:
    """A user's workspace is theirs across sandboxes; a pooled sandbox's is its own until claimed."""
    return str(user_id) if user_id is not None else f"pool-{sandbox_id}"


class Running:
    """Every running sandbox by id: users' (also by user) and the warm pool's (in the order started)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Sandbox] = {}
        self._by_user: dict[int, Sandbox] = {}
        self._warm: list[Sandbox] = []

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Sandbox]:
        return iter(list(self._by_id.values()))

    def holds(self, sandbox: Sandbox) -> bool:
        return self._by_id.get(sandbox.id) is sandbox

    def of_user(self, user_id: int) -> Sandbox | None:
        return self._by_user.get(user_id)

    def users(self) -> list[Sandbox]:
        return [s for s in self._by_id.values() if s.user_id is not None]

    @property
    def warm(self) -> tuple[Sandbox, ...]:
        return tuple(self._warm)

    def add(self, sandbox: Sandbox) -> None:
        self._by_id[sandbox.id] = sandbox
        if sandbox.user_id is None:
            self._warm.append(sandbox)
        else:
            self._by_user[sandbox.user_id] = sandbox

    def remove(self, sandbox: Sandbox) -> None:
        """Forget the sandbox wherever it is held (a replaced one may share its id or user: not those)."""
        if self._by_id.get(sandbox.id) is sandbox:
            del self._by_id[sandbox.id]
        if sandbox.user_id is not None and self._by_user.get(sandbox.user_id) is sandbox:
            del self._by_user[sandbox.user_id]
        if sandbox in self._warm:
            self._warm.remove(sandbox)

    def take_warm(self, tier: Tier) -> Sandbox | None:
        """A warm sandbox of `tier` whose supervisor answers, out of the pool (it still runs)."""
        for sandbox in self._warm:
            if sandbox.tier == tier and sandbox.client.connected:
                self._warm.remove(sandbox)
                return sandbox
        return None

    def assign(self, sandbox: Sandbox, user_id: int, tenant: str, user: str) -> None:
        """A sandbox taken from the pool is the user's."""
        sandbox.user_id, sandbox.tenant, sandbox.user = user_id, tenant, user
        self._by_user[user_id] = sandbox

    def newest_warm(self) -> Sandbox | None:
        return self._warm[-1] if self._warm else None

    def idle_since(self, now: datetime, seconds: float) -> list[Sandbox]:
        """Users' running sandboxes without a call for `seconds`, least recently used first."""
        cutoff = now - timedelta(seconds=seconds)
        idle = [
            s
            for s in self.users()
            if s.state is State.RUNNING and s.last_used_at < cutoff and not s.client.in_flight
        ]
        return sorted(idle, key=lambda s: s.last_used_at)

    def clear(self) -> None:
        self._by_id.clear()
        self._by_user.clear()
        self._warm.clear()
