"""Where a sandbox's files are on the host: a dir of its own under the fleet home's `sandboxes/`.

| in the sandbox's dir   | what                                                        | written by  |
|------------------------|-------------------------------------------------------------|-------------|
| `token`                | the supervisor's token, for a successor gateway to adopt it | the gateway |
| `channel/`             | bound at /run/mcpfleet: the gateway's socket, the supervisor's config; a tiny tmpfs | the sandbox too |
| `tools/`               | the servers' code, bound read-only                          | the gateway |
| `workspace/`           | the user's workspace, mounted here while the sandbox lives  | the sandbox too |
| `checkpoint.partial/`  | a checkpoint being written                                  | the backend |
| `checkpoint/`          | a complete checkpoint image (renamed from `.partial` only after the backend succeeded) | the backend |
| `checkpoint.spent/`    | an image a resume used, being deleted (off the resume's path)  | the gateway |
| `bundle/`, `*.log`     | the backend's own files and the logs that explain a failure | the backend |

The dir is 0711 and root's: the sandbox sees only what is bound into it (channel, tools,
workspace), so the token next to them stays out of its reach.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox import tmpfs, wire
from sandbox.bundle import TOOLS_DIR

if TYPE_CHECKING:
    from sandbox.workspaces import Workspaces

log = logging.getLogger(__name__)

SANDBOXES_DIR = "sandboxes"


@dataclass(frozen=True)
class SandboxLayout:
    home: Path
    """The fleet home."""
    sandbox_id: str

    @staticmethod
    def root(home: Path) -> Path:
        """Every sandbox's dir is in here (and nothing else is: recovery removes what has no row)."""
        return Path(home) / SANDBOXES_DIR

    @property
    def dir(self) -> Path:
        return self.root(self.home) / self.sandbox_id

    @property
    def token(self) -> Path:
        return self.dir / "token"

    @property
    def channel(self) -> Path:
        return self.dir / "channel"

    @property
    def socket(self) -> Path:
        return self.channel / wire.SOCKET_NAME

    @property
    def config(self) -> Path:
        return self.channel / wire.CONFIG_NAME

    @property
    def tools(self) -> Path:
        return self.dir / TOOLS_DIR

    @property
    def workspace(self) -> Path:
        return self.dir / "workspace"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def checkpoint_partial(self) -> Path:
        return self.dir / "checkpoint.partial"

    @property
    def checkpoint_spent(self) -> Path:
        """An image a resume used, renamed out of the way and deleted after the resume returned."""
        return self.dir / "checkpoint.spent"

    @property
    def runtime_dirs(self) -> tuple[Path, ...]:
        """What goes when the sandbox does, though its logs stay to explain a failure."""
        return (
            self.dir / "bundle", self.channel, self.checkpoint, self.checkpoint_partial, self.checkpoint_spent,
            self.workspace,
        )  # fmt: skip


def write_token(layout: SandboxLayout, token: str) -> None:
    # O_EXCL: a fresh sandbox id never finds a token; if one is there, something else made it.
    fd = os.open(layout.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def read_token(layout: SandboxLayout) -> str:
    return layout.token.read_text()


def make_channel(layout: SandboxLayout, uid: int, gid: int) -> Path:
    """The sandbox's channel dir, bound in read-write: a tiny tmpfs of its own (`sandbox.tmpfs`),
    so that nothing written there lands on the host's disk, outside the sandbox's quota."""
    tmpfs.mount(layout.channel, size_bytes=tmpfs.CHANNEL_BYTES, inodes=tmpfs.CHANNEL_INODES, uid=uid, gid=gid)
    return layout.channel


def drop_channel(layout: SandboxLayout) -> None:
    tmpfs.unmount(layout.channel)
    shutil.rmtree(layout.channel, ignore_errors=True)


def forget(layout: SandboxLayout, workspaces: Workspaces, *, keep_logs: bool) -> None:
    """Remove a sandbox's runtime files (all of its dir unless `keep_logs`); never into a mounted workspace."""
    workspaces.unmount(layout.workspace)
    tmpfs.unmount(layout.channel)
    if _has_mounts_below(layout.dir):
        log.error("not removing %s: something is still mounted below it", layout.dir)
        return
    if keep_logs:
        for path in layout.runtime_dirs:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
    else:
        shutil.rmtree(layout.dir, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _has_mounts_below(directory: Path) -> bool:
    prefix = str(directory.resolve()) + "/"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    for line in mountinfo.splitlines():
        mountpoint = line.split()[4].replace("\\040", " ")
        if mountpoint.startswith(prefix):
            return True
    return False
