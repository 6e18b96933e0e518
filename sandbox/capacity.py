"""How many sandboxes may run, and which one makes room when none may.

The node's cap (`Lifecycle.max_running`) counts every running sandbox, the warm pool's too, and
every start or resume under way (each holds a place from before it begins, so concurrent starts
cannot overshoot); a tenant's cap counts its users' sandboxes. When a cap is full, the warm pool
gives way first (its sandboxes are nobody's), then the least recently used idle sandbox hibernates.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from sandbox.errors import QuotaExceeded
from sandbox.running import Running, Sandbox
from sandbox.store import State


@dataclass(frozen=True)
class Eviction:
    sandbox: Sandbox
    reason: str
    hibernate: bool
    """True: hibernate it (a user's); False: stop it (a warm one, nobody's)."""


class Capacity:
    def __init__(self, running: Running, max_running: int, warm_pool_size: int):
        self.running = running
        self.max_running = max_running
        self.warm_pool_size = warm_pool_size
        self.lock = asyncio.Lock()
        """Held while room is made and a place taken, so two starts do not count the same free place."""
        self._held: Counter[str | None] = Counter()
        """Places held by starts and resumes under way, per tenant (None: the warm pool's)."""

    def hold(self, tenant: str | None) -> None:
        self._held[tenant] += 1

    def release(self, tenant: str | None) -> None:
        self._held[tenant] -= 1

    def eviction(self, tenant: str, tenant_max: int | None, *, exclude_user: int) -> Eviction | None:
        """What must go before one more of `tenant`'s sandboxes may run; None if one may.
        Raises QuotaExceeded when a cap is full and every sandbox under it is busy."""
        users = self.running.users()
        of_tenant = [s for s in users if s.tenant == tenant]
        tenant_full = tenant_max is not None and len(of_tenant) + self._held[tenant] >= tenant_max
        node_full = len(self.running) + self._held.total() >= self.max_running
        if not tenant_full and not node_full:
            return None
        warm = self.running.newest_warm()
        if node_full and not tenant_full and warm is not None:
            return Eviction(warm, "the node needed room", hibernate=False)
        candidates = of_tenant if tenant_full else users
        idle = [
            s for s in candidates if s.user_id != exclude_user and s.state is State.RUNNING and s.client.in_flight == 0
        ]
        if not idle:
            if tenant_full:
                raise QuotaExceeded(
                    f"tenant {tenant!r} may run {tenant_max} sandbox{'es' if tenant_max != 1 else ''} at once, "
                    "and all are busy; try again shortly"
                )
            raise QuotaExceeded(
                f"this node runs its maximum of {self.max_running} sandboxes and all are busy; try again shortly"
            )
        victim = min(idle, key=lambda s: s.last_used_at)
        why = f"tenant {tenant!r} reached its cap" if tenant_full else "the node was full"
        return Eviction(victim, f"least recently used when {why}", hibernate=True)

    def pool_shortfall(self) -> int:
        """How many warm sandboxes to start now: those missing from the pool, as far as the node has room."""
        missing = self.warm_pool_size - len(self.running.warm) - self._held[None]
        room = self.max_running - len(self.running) - self._held.total()
        return max(0, min(missing, room))
