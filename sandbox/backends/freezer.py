"""Freezing an idle sandbox in place: its cgroup's freezer stops every process of it (the sentry,
the gofer, the platform's stubs) where it is, and thawing lets them go on as if nothing happened.

Why: on gVisor 2024-07's systrap platform an idle sandbox is not idle. Its sentry wakes about
3,000 times a second (the platform's fast-path monitor sleeps 400 µs in a loop; gVisor parks it
only in releases after June 2026), which costs about 2 % of a core per running sandbox with no
call in flight (`bench/idle_cpu.py`). A frozen sandbox costs nothing, keeps its memory, and answers
the next call after a thaw, which is a write to one cgroup file.

cgroup v1 (`freezer/<parent>/<id>/freezer.state`: FROZEN, THAWED) and v2 (`<parent>/<id>/cgroup.freeze`:
1, 0, settled when `cgroup.events` says `frozen 1`) alike; where neither is, nothing is frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SETTLE_S = 2.0
"""How long a freeze may take to settle (every task stopped) before it is undone."""


class CgroupFreezer:
    def __init__(self, cgroup_parent: str, root: Path = CGROUP_ROOT):
        self.relative = cgroup_parent.strip("/")
        self.root = root

    def _v1(self, sandbox_id: str) -> Path:
        return self.root / "freezer" / self.relative / sandbox_id / "freezer.state"

    def _v2(self, sandbox_id: str) -> Path:
        return self.root / self.relative / sandbox_id / "cgroup.freeze"

    def _frozen(self, sandbox_id: str) -> bool:
        v1 = self._v1(sandbox_id)
        if v1.exists():
            return v1.read_text().strip() == "FROZEN"
        events = self._v2(sandbox_id).with_name("cgroup.events")
        return "frozen 1" in events.read_text().splitlines()

    async def freeze(self, sandbox_id: str, wanted: Callable[[], bool] = lambda: True) -> bool:
        """Stop the sandbox's processes; True once all are stopped. False where its cgroup has no
        freezer, when they did not all stop within SETTLE_S (then it is thawed again), or when
        `wanted()` turned False meanwhile (a message came for it, and its thaw was written)."""
        v1, v2 = self._v1(sandbox_id), self._v2(sandbox_id)
        try:
            if v1.exists():
                v1.write_text("FROZEN")
            elif v2.exists():
                v2.write_text("1")
            else:
                return False
            deadline = asyncio.get_running_loop().time() + SETTLE_S
            while not self._frozen(sandbox_id):
                if not wanted():
                    return False
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("sandbox %s did not freeze within %.0f s; thawed again", sandbox_id, SETTLE_S)
                    self.thaw(sandbox_id)
                    return False
                await asyncio.sleep(0.01)
        except OSError as exc:  # the sandbox went meanwhile (its cgroup with it)
            log.info("sandbox %s was not frozen: %s", sandbox_id, exc)
            self.thaw(sandbox_id)
            return False
        return wanted()

    def thaw(self, sandbox_id: str) -> None:
        """Let the sandbox's processes go on (at once: a thaw does not wait for anything)."""
        v1, v2 = self._v1(sandbox_id), self._v2(sandbox_id)
        with contextlib.suppress(OSError):
            if v1.exists():
                v1.write_text("THAWED")
            elif v2.exists():
                v2.write_text("0")

    def thaw_all(self) -> list[str]:
        """Thaw every sandbox under the parent, whoever froze it (a gateway that died): the ids thawed."""
        thawed = []
        for state in sorted((self.root / "freezer" / self.relative).glob("*/freezer.state")):
            with contextlib.suppress(OSError):
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")
                    thawed.append(state.parent.name)
        for freeze in sorted((self.root / self.relative).glob("*/cgroup.freeze")):
            with contextlib.suppress(OSError):
                if freeze.read_text().strip() != "0":
                    freeze.write_text("0")
                    thawed.append(freeze.parent.name)
        return thawed

    def cpu_seconds(self, sandbox_id: str) -> float | None:
        """CPU time the sandbox's processes have used, from its cgroup (None where it has none)."""
        v1 = self.root / "cpuacct" / self.relative / sandbox_id / "cpuacct.usage"
        v2 = self.root / self.relative / sandbox_id / "cpu.stat"
        try:
            if v1.exists():
                return int(v1.read_text()) / 1e9
            if v2.exists():
                usage = next(line for line in v2.read_text().splitlines() if line.startswith("usage_usec "))
                return int(usage.split()[1]) / 1e6
        except (OSError, ValueError, StopIteration):
            return None
        return None
