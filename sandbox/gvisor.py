"""Which gVisor runs the sandboxes: the `runsc` binary and its platform.

scripts/setup.sh unpacks gVisor 2024-07 (Debian's 0.0~20240729, from bookworm-backports or
trixie) under /opt, beside the system's runsc, which on Debian 12 is 2022-12 and stays installed
as the fallback. The platform is chosen by measurement on this machine (bench/sandbox_lifecycle.py):
the new runsc's systrap costs about 2 µs per system call against 70-90 µs for ptrace, and ptrace
is the only platform the old runsc offers without KVM.

Systrap has an idle cost that ptrace has not: on this runsc every sandbox's sentry wakes about
3,000 times a second with nothing to do (systrap's fast-path monitor sleeps 400 µs in a loop;
parked when idle only in gVisor releases after google/gvisor#13470, 2026-06), about 2 % of a core
per sandbox here, the same for a bare `sleep infinity` as for a fleet sandbox; on ptrace it is
nothing measurable. A sandbox frozen in its cgroup, or hibernated, costs nothing (bench/idle_cpu.py).

    MCPFLEET_RUNSC           path of the runsc to run (default: the pinned one if unpacked, else `runsc`)
    MCPFLEET_RUNSC_PLATFORM  systrap, ptrace or kvm (default: systrap where runsc has it, else ptrace)
    MCPFLEET_RUNSC_COMPRESS_CHECKPOINTS  1: runsc's default, compressed checkpoint state (slower to save)
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PINNED_RUNSC = Path("/opt/mcpfleet/gvisor-20240729/usr/bin/runsc")
"""Where scripts/setup.sh unpacks the pinned release (GVISOR_DIR there)."""
SYSTRAP_SINCE = 20230101
"""The first release whose runsc has the systrap platform (it came in 2023, default from mid-2023)."""
PLATFORMS = ("systrap", "ptrace", "kvm")


@dataclass(frozen=True)
class Gvisor:
    runsc: str
    """The binary, as a path or a name on PATH."""
    platform: str
    release: int | None
    """runsc's release date as YYYYMMDD (from `runsc --version`), None if it did not say."""

    uncompressed_checkpoints: bool
    """`runsc checkpoint -compression none`, where runsc has it (not 2022-12) and it is not turned off:
    0.16 s against 0.5 s to save a 30 MB Python here. On 2024-07 the memory pages go to a file of
    their own uncompressed either way (163 MiB for the built-in servers' sandbox, measured with and
    without the flag, against 41 MiB compressed by 2022-12), so the flag costs no disk."""

    def checkpoint_flags(self) -> list[str]:
        return ["-compression", "none"] if self.uncompressed_checkpoints else []


def choose(runsc: str | None = None, platform: str | None = None, compress: bool | None = None) -> Gvisor:
    """The runsc and platform given, else the environment's, else the defaults described above."""
    binary = runsc or os.environ.get("MCPFLEET_RUNSC") or (str(PINNED_RUNSC) if _executable(PINNED_RUNSC) else "runsc")
    release = runsc_release(binary)
    chosen = platform or os.environ.get("MCPFLEET_RUNSC_PLATFORM") or default_platform(release)
    if chosen not in PLATFORMS:
        raise RuntimeError(f"MCPFLEET_RUNSC_PLATFORM must be one of {', '.join(PLATFORMS)}, not {chosen!r}")
    if chosen == "systrap" and release is not None and release < SYSTRAP_SINCE:
        raise RuntimeError(f"{binary} (gVisor {release}) has no systrap platform: it came in 2023")
    if compress is None:
        compress = os.environ.get("MCPFLEET_RUNSC_COMPRESS_CHECKPOINTS", "") in ("1", "true", "yes")
    return Gvisor(binary, chosen, release, not compress and _checkpoint_help_has(binary, "-compression"))


def default_platform(release: int | None) -> str:
    return "systrap" if release is not None and release >= SYSTRAP_SINCE else "ptrace"


@functools.cache
def runsc_release(binary: str) -> int | None:
    """`runsc version 0.0~20240729.0` -> 20240729; None when runsc is missing or says otherwise."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(20\d{6})", out)
    return int(match.group(1)) if match else None


@functools.cache
def _checkpoint_help_has(binary: str, flag: str) -> bool:
    try:
        out = subprocess.run([binary, "help", "checkpoint"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in out.stdout + out.stderr


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
