"""Freeze sandboxes that are idle twice over: no call for `idle_s`, and nothing running inside (their
CPU since the last sweep no more than the platform's own idle cost). A frozen sandbox costs no CPU and
keeps everything; the next message to it (a call, a configure, a detach before a hibernation, data on
an egress tunnel) thaws it first (`SupervisorClient.wake`). Why freeze at all: `sandbox.backends.freezer`.

Processes inside that only wait on a timer (a `sleep`, a periodic job) pause while it is frozen, as they
do while it is hibernated; one that works (a build left running) keeps it thawed by its CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from sandbox.backends.base import Freezing
from sandbox.running import Sandbox
from sandbox.store import State

log = logging.getLogger(__name__)

IDLE_CPU = 0.05
"""Cores a sandbox may use and still count as idle inside: gVisor's own idle cost on systrap is
0.02-0.025 (`bench/idle_cpu.py`); anything running in it uses more."""


class IdleFreezer:
    def __init__(self, backend: Freezing, idle_s: float, idle_cpu: float = IDLE_CPU):
        self.backend = backend
        self.idle_s = idle_s
        self.idle_cpu = idle_cpu
        self._seen: dict[str, tuple[float, float]] = {}
        """Per sandbox idle by calls: when (monotonic) its CPU count was last read, and what it was."""

    async def sweep(self, sandboxes: Iterable[Sandbox]) -> list[str]:
        """Freeze those idle by calls and by CPU since the last sweep; the ids frozen now."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.idle_s)
        frozen: list[str] = []
        candidates: set[str] = set()
        for sandbox in list(sandboxes):
            if (sandbox.state is not State.RUNNING or sandbox.client.in_flight or not sandbox.client.connected
                    or sandbox.last_used_at > cutoff or self.backend.is_frozen(sandbox.id)):
                continue
            used = self.backend.cpu_seconds(sandbox.id)
            if used is None:
                continue
            candidates.add(sandbox.id)
            now = time.monotonic()
            before = self._seen.get(sandbox.id)
            self._seen[sandbox.id] = (now, used)
            if before is None:
                continue  # one more sweep: CPU is a rate
            cores = (used - before[1]) / max(now - before[0], 1e-3)
            if cores > self.idle_cpu:
                continue
            if await self.backend.freeze(sandbox.id):
                frozen.append(sandbox.id)
                log.info("froze idle sandbox %s (no call for %g s, %.3f cores since the last sweep)",
                         sandbox.id, self.idle_s, cores)
        for gone in set(self._seen) - candidates:
            del self._seen[gone]
        return frozen
