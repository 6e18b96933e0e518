"""Small host tmpfs mounts, for what a sandbox may write outside its workspace image.

Whatever a sandbox can write must count against a quota of its own. Its channel dir (and a
trial's whole workspace) is bound in from the host, so it cannot be a plain directory on the
host's disk: a `dd` inside would fill the disk every user shares. Each is a tmpfs of its own
instead, a few bytes and inodes large, owned by the sandbox's user: a filler gets ENOSPC at once,
and nothing of it ever reaches the disk (the servers' environment in the supervisor's config
included).

Mounts outlive the gateway that made them, as the workspaces' do: a gateway restarted after a
crash finds them still there for the sandboxes it adopts, and unmounts the others.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from sandbox.mounts import is_mounted

log = logging.getLogger(__name__)

CHANNEL_BYTES = 1024 * 1024
"""A channel holds the supervisor's config (read once and deleted) and the gateway's socket."""
CHANNEL_INODES = 64


class TmpfsError(OSError):
    """A mount or unmount failed; the message says which and why."""


def mount(at: Path, *, size_bytes: int, inodes: int, uid: int, gid: int) -> None:
    """A fresh tmpfs at `at` (made if missing), its root `uid`:`gid` mode 0700; nothing if one is there."""
    at = Path(at).absolute()
    at.mkdir(mode=0o700, parents=True, exist_ok=True)
    if is_mounted(at):
        return
    options = f"size={size_bytes},nr_inodes={inodes},mode=0700,uid={uid},gid={gid},nosuid,nodev,noexec"
    _run("mount", "-t", "tmpfs", "-o", options, "mcpfleet", str(at))


def unmount(at: Path) -> bool:
    """Unmount the tmpfs at `at` (lazily if something on the host still uses it); False if none was."""
    at = Path(at).absolute()
    if not is_mounted(at):
        return False
    if subprocess.run(["umount", str(at)], capture_output=True, text=True).returncode != 0 and is_mounted(at):
        log.warning("unmounting %s lazily: it is busy", at)
        _run("umount", "--lazy", str(at))
    return True


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise TmpfsError(f"{' '.join(argv[:2])} failed ({result.returncode}): {result.stderr.strip()}")
