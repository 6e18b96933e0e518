"""What is mounted on this host, and which loop devices back which files: read from
/proc/self/mountinfo and sysfs, as `findmnt` and `losetup --list` read them, without a process.

Workspaces (loop-mounted images) and the channels' tmpfs mounts outlive the gateway that made
them; a gateway starting after a crash reads these to find what it must adopt or remove.

They are all made below one shared mount, the fleet home's sandboxes dir, which `share` makes
(with `mount`, the one command here): every mount namespace made on this host copies the mounts
there are (each runsc gofer and sandbox does, and keeps its copies until it has pivoted into its
own root), and only below a shared mount does an unmount here reach those copies, and with them
the loop device of the image. Not unbindable, which would also keep it out of other namespaces'
binds: runsc binds the sandbox's own dirs from below it. A namespace that makes its copies
private (`unshare --mount` does by default) still keeps them until it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor" of the mounted filesystem
    mountpoint: Path
    source: str
    propagation: tuple[str, ...] = ()  # mountinfo's optional fields: "shared:N", "master:N", ...


@dataclass(frozen=True)
class Loop:
    name: str  # /dev/loopN
    device: str  # its own "major:minor"
    backing: tuple[str, int]  # ("major:minor", inode) of the image file


def majmin(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    found = []
    # Paths are bytes to the kernel: any that are not UTF-8 survive as surrogate escapes, as os.fsdecode gives them.
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            tail = fields[separator + 1 :]
            found.append(Mount(fields[2], Path(unescape(fields[4])), unescape(tail[1]), tuple(fields[6:separator])))
    return found


def mount_at(at: Path) -> Mount | None:
    """The mount on top at `at`, if `at` is a mountpoint (os.path.ismount misses bind mounts of a directory)."""
    at = Path(at).absolute()
    return next((m for m in reversed(mounts()) if m.mountpoint == at), None)


def is_mounted(at: Path) -> bool:
    return mount_at(at) is not None


def loops() -> list[Loop]:
    """The bound loop devices, read from sysfs: `losetup --list` reads the same, for a process more."""
    found = []
    for sysfs in Path("/sys/block").glob("loop*"):
        try:
            backing = (sysfs / "loop" / "backing_file").read_text().removesuffix("\n")
            device = (sysfs / "dev").read_text().strip()
            st = os.stat(backing)  # the kernel gives the file's name now: a rename is followed
        except OSError:
            continue  # unbound, or its file deleted
        found.append(Loop(f"/dev/{sysfs.name}", device, (majmin(st.st_dev), st.st_ino)))
    return found


def holders(device: str, limit: int = 3) -> list[str]:
    """Processes of other mount namespaces that mount `device` ("major:minor"), one per namespace:
    "pid N (command)". A loop device unmounted here stays attached while any namespace holds a copy
    of its mount, and every namespace made on this host (each runsc gofer and sandbox, until it has
    pivoted into its own root) copies all the mounts there were; below a shared mount (`share`) the
    unmount reaches those copies, elsewhere it does not. For the message of a refused mount."""
    ours = os.readlink("/proc/self/ns/mnt")
    seen: set[str] = {ours}
    found: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or len(found) >= limit:
            continue
        try:
            namespace = os.readlink(proc / "ns" / "mnt")
            if namespace in seen:
                continue
            seen.add(namespace)
            with open(proc / "mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                if not any(line.split()[2] == device for line in f):
                    continue
            command = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        found.append(f"pid {proc.name} ({Path(command).name or '?'})")
    return found


def is_shared(mount: Mount) -> bool:
    return any(field.startswith("shared:") for field in mount.propagation)


def share(at: Path) -> str | None:
    """Make `at` a shared mount of its own, bound onto itself if it is none yet; None once it is, else why not.

    Idempotent: a gateway restarted after a crash finds it there, with the sandboxes' mounts below
    it, and leaves it as it is; after a reboot it is made anew. Shared, the mounts made below it
    propagate to the copies other mount namespaces make of it, and so do their unmounts: runsc's
    gofer and sandbox run in a user namespace of their own, whose copies the kernel turns into
    slaves (nothing they do comes back here), and they drop them when they pivot into their own
    root, before any user code runs; what stays in a gofer is what it binds of its own sandbox.
    Its peer group is its own (made private, then shared), not that of the mount it sits on, so
    nothing mounted below it appears anywhere else on this host.
    """
    at = Path(at).absolute()
    mount = mount_at(at)
    if mount is None:
        below = [m.mountpoint for m in mounts() if m.mountpoint.is_relative_to(at)]
        if below:  # a bind now would hide them, and their loop devices with them, under it
            return f"{len(below)} mounts below it were made before it was shared (e.g. {below[0]}); it is shared at a start without them"
        if (problem := _run("mount", "--bind", str(at), str(at))) is not None:
            return problem
        return _run("mount", "--make-private", str(at)) or _run("mount", "--make-shared", str(at))
    return None if is_shared(mount) else _run("mount", "--make-shared", str(at))


def unshare(at: Path) -> bool:
    """Unmount the bind `share` made of `at` onto itself, once nothing is mounted below it; True if it went.
    For a gateway that stopped every sandbox: it leaves the host as it found it. A filesystem of its
    own that an operator mounted there (another device than the dir's parent) stays."""
    at = Path(at).absolute()
    here = [m for m in mounts() if m.mountpoint.is_relative_to(at)]
    if len(here) != 1 or here[0].mountpoint != at or os.stat(at).st_dev != os.stat(at.parent).st_dev:
        return False
    return _run("umount", str(at)) is None


def _run(*command: str) -> str | None:
    """None if the command worked, else why not."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{command[0]} did not run ({exc})"
    return None if done.returncode == 0 else f"{' '.join(command)} failed: {done.stderr.strip() or done.returncode}"
