"""Each server under a uid of its own, so that servers in one sandbox are strangers to each other.

Under one uid, any server (and any code the exec server runs) could read a neighbour's
/proc/PID/environ (its secrets), its memory and its files, and signal it. So the supervisor runs
as root inside the sandbox (gVisor's root, with a handful of capabilities: `bundle.SUPERVISOR_CAPS`)
and starts each server under a uid of its own, from `SupervisorConfig.server_uids` up, without any
capability. The uid of a server stays the same for the supervisor's life; a server that comes later
(`configure`) gets the next one, never one another server had.

All servers share one group, the workspace's (`SupervisorConfig.server_gid`): the workspace is
theirs together (mode 2770, the setgid bit keeps new files in the group, and servers run with umask
007, so what one writes the others may change). What a server keeps to itself goes in its private
dir, /tmp/.servers/NAME (0700, its TMPDIR); /tmp/.servers belongs to root, so no server can put a
name there first.

Without root (a Kubernetes pod run as non-root, or the supervisor run on the host in tests), servers
run as the supervisor does, as before; the egress proxy's peer check still tells them apart.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any

from sandbox.supervisor import launch
from sandbox.supervisor.config import _PYTHON, PYTHON_FLAGS

PRIVATE_ROOT = "/tmp/.servers"
WORKSPACE = "/workspace"
"""As `sandbox.bundle.WORKSPACE` (the supervisor imports nothing of the sandbox package but the wire)."""
WORKSPACE_MODE = 0o2770
SERVER_UMASK = 0o007
LAUNCHER = "sandbox.supervisor.launch"
PIPE_BYTES = 60_000
"""What a pipe holds without its reader (64 KiB on Linux and gVisor), with room to spare."""


class ServerUids:
    def __init__(self, first: int, gid: int, *, workspace: str = WORKSPACE, private_root: str = PRIVATE_ROOT):
        self.enabled = first > 0 and gid > 0 and os.geteuid() == 0
        self.gid = gid
        self.workspace = workspace
        self.private_root = private_root
        self._next = first
        self._uids: dict[str, int] = {}
        if first > 0 and not self.enabled:
            print("supervisor: not root, so every server runs under the supervisor's uid", file=sys.stderr, flush=True)

    def uid_of(self, name: str) -> int | None:
        """The server's uid (given at its first start); None when servers run as the supervisor."""
        if not self.enabled:
            return None
        if name not in self._uids:
            self._uids[name] = self._next
            self._next += 1
        return self._uids[name]

    def prepare(self) -> None:
        """Once, before any server runs: the private dirs' root, and the workspace shared by group."""
        if not self.enabled:
            return
        os.makedirs(self.private_root, mode=0o711, exist_ok=True)
        st = os.lstat(self.private_root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise RuntimeError(f"{self.private_root} is not root's own directory")
        os.chmod(self.private_root, 0o711)
        if os.path.isdir(self.workspace):
            share_workspace(self.workspace, self.gid)

    def start(self, name: str, argv: list[str], common_env: dict[str, str], own_env: dict[str, str]) -> Start:
        """How to start the server as itself: its uid, the shared group and no other, the umask that
        keeps the workspace shared, its private dir as TMPDIR, and its own environment (`own_env`: its
        secrets, its proxy credentials) through the launcher's pipe wherever it can (`launch`)."""
        uid = self.uid_of(name)
        if uid is None:
            return Start(argv, {"env": {**common_env, **own_env}})
        private = self.private_dir(name, uid)
        options: dict[str, Any] = {"user": uid, "group": self.gid, "extra_groups": [], "umask": SERVER_UMASK}
        common_env = {**common_env, "TMPDIR": private}
        if not (_PYTHON.match(os.path.basename(argv[0])) and launch.runnable(argv[1 + _flags(argv):])):
            return Start(argv, {**options, "env": {**common_env, **own_env}})
        data = json.dumps(own_env).encode()
        if len(data) > PIPE_BYTES:
            raise RuntimeError(f"its environment is over {PIPE_BYTES} bytes")
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, data)  # the pipe holds it all: nobody waits for the launcher to read
        finally:
            os.close(write_end)
        at = 1 + _flags(argv)
        launcher = [*argv[:at], "-m", LAUNCHER, str(read_end), *argv[at:]]
        return Start(launcher, {**options, "env": common_env, "pass_fds": (read_end,)}, (read_end,))

    def private_dir(self, name: str, uid: int) -> str:
        """/tmp/.servers/NAME, the server's alone (0700), made anew if anything else holds the name."""
        private = os.path.join(self.private_root, name)
        try:
            os.mkdir(private, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(private)
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeError(f"{private} is not a directory")
        os.chown(private, uid, 0)
        os.chmod(private, 0o700)
        return private


@dataclass
class Start:
    """A server's argv and the rest of `subprocess.Popen`'s arguments; `close()` once it started."""

    argv: list[str]
    options: dict[str, Any]
    fds: tuple[int, ...] = ()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


def _flags(argv: list[str]) -> int:
    """How many of the interpreter's own flags follow it (`config.PYTHON_FLAGS`, no-argument flags)."""
    count = 0
    for arg in argv[1:]:
        if arg not in PYTHON_FLAGS:
            break
        count += 1
    return count


def share_workspace(path: str, gid: int) -> None:
    """The workspace and everything in it in the servers' group, writable by it; the workspace's own
    mode goes last, so a workspace already shared is left alone (a walk of a large one takes a while).

    Runs before any server does, so nothing in the workspace changes under the walk: symlinks are
    never followed (os.walk does not descend into them and they are skipped here).
    """
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) == WORKSPACE_MODE and st.st_gid == gid:
        return
    for root, dirs, files in os.walk(path):
        for entry in dirs + files:
            full = os.path.join(root, entry)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                continue
            os.chown(full, -1, gid)
            extra = stat.S_IRGRP | stat.S_IWGRP
            if stat.S_ISDIR(st.st_mode):
                extra |= stat.S_IXGRP | stat.S_ISGID
            elif st.st_mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP
            os.chmod(full, stat.S_IMODE(st.st_mode) | extra)
    os.chown(path, -1, gid)
    os.chmod(path, WORKSPACE_MODE)
