"""The memory a running sandbox holds, measured live on this host: the proportional set size (PSS)
of its runsc processes (sentry, gofer, and on the ptrace platform the stubs under the sentry).

PSS counts a page shared by k processes 1/k to each, so summed over a sandbox's processes the runsc
binary and what they share count once (RSS would count them in every process) and the sandboxes'
figures add up to what they take from the host. Reading /proc/<pid>/smaps_rollup walks each
process's page tables, so a `MemoryGauge` keeps figures a few seconds: a page view or a listing
does not rescan every time. Only the runsc backend runs its sandboxes as processes of this host;
for the others (docker's containers, kubernetes pods) there is no figure here (None).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from sandbox.backends.runsc import descendant_pids, runsc_processes

CACHE_S = 10.0


def pss_bytes(pids: Iterable[int]) -> int:
    """The summed `Pss:` of /proc/<pid>/smaps_rollup (processes that are gone count 0)."""
    total = 0
    for pid in set(pids):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def runsc_pss(root: Path, sandbox_ids: Iterable[str]) -> dict[str, int | None]:
    """Sandbox id -> PSS of its processes (None: none runs on this host), from one scan of /proc."""
    processes = runsc_processes(root)
    found: dict[str, int | None] = {}
    for sandbox_id in sandbox_ids:
        pids = [pid for pid, argv in processes if any(sandbox_id in arg for arg in argv)]
        pids += [child for pid in pids for child in descendant_pids(pid)]
        found[sandbox_id] = pss_bytes(pids) or None
    return found


class MemoryGauge:
    """`runsc_pss` with each sandbox's figure kept `cache_s` seconds."""

    def __init__(self, root: Path, cache_s: float = CACHE_S):
        self.root, self.cache_s = root, cache_s
        self._kept: dict[str, tuple[float, int | None]] = {}

    def measure(self, sandbox_ids: Iterable[str]) -> dict[str, int | None]:
        now = time.monotonic()
        wanted = list(sandbox_ids)
        stale = [i for i in wanted if i not in self._kept or now - self._kept[i][0] > self.cache_s]
        if stale:
            for sandbox_id, value in runsc_pss(self.root, stale).items():
                self._kept[sandbox_id] = (now, value)
        # Forget what has not been asked about for a while (reclaimed sandboxes).
        self._kept = {i: kept for i, kept in self._kept.items() if now - kept[0] <= 10 * self.cache_s}
        return {i: self._kept[i][1] if i in self._kept else None for i in wanted}
