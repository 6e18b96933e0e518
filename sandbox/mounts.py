"""What is mounted on this host, and which loop devices back which files: read from
/proc/self/mountinfo and sysfs, as `findmnt` and `losetup --list` read them, without a process.

Workspaces (loop-mounted images) and the channels' tmpfs mounts outlive the gateway that made
them; a gateway starting after a crash reads these to find what it must adopt or remove.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    device: str  # "major:minor" of the mounted filesystem
    mountpoint: Path
    source: str


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
            tail = fields[fields.index("-") + 1 :]
            found.append(Mount(fields[2], Path(unescape(fields[4])), unescape(tail[1])))
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
    pivoted into its own root) copies all the mounts there were. For the message of a refused mount."""
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
