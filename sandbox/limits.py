"""How much of the machine one sandbox may use."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 512 * MiB
    """All memory of the sandbox (its processes, its /tmp, gVisor's own); past it the sandbox is killed."""
    pids: int = 256
    """Processes and threads the sandbox's user may have at once; past it fork fails with EAGAIN."""
    cpus: float = 1.0
    cpu_period_us: int = 100_000

    def __post_init__(self) -> None:
        if self.memory_bytes < 64 * MiB:
            raise ValueError("a sandbox needs at least 64 MiB of memory")
        if self.pids < 16:
            raise ValueError("a sandbox needs at least 16 pids")
        if self.cpus <= 0:
            raise ValueError("cpus must be positive")

    @property
    def cpu_quota_us(self) -> int:
        return int(self.cpus * self.cpu_period_us)
