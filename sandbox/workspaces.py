"""Per-user workspaces with a hard disk quota: one sparse ext4 image per workspace.

A workspace is `root/<key>.img`, loop-mounted on the host while its sandbox
lives; the backend bind-mounts that mountpoint into the sandbox as /workspace.
A disk filler inside then gets ENOSPC at its own quota, and the host disk, like
every other workspace, keeps its space: the image is sparse, so it takes on the
host only what was written to it, and never more than its size.

Where loop mounts do not work (no root, no loop devices, no e2fsprogs), each
workspace is a plain directory `root/<key>/` bind-mounted the same way: the
same API, without a quota.

The functions are synchronous: each takes milliseconds (mkfs of an empty image
included), except `create` with a large `seed_from` and an offline `resize`.
Every command is e2fsprogs' or util-linux's; the kernel keeps the state (which
image is attached to which loop device, what is mounted where), so a gateway
restarted after a crash reads it back rather than trusting a record of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sandbox import mounts as hostmounts

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MIN_QUOTA = 16 * 1024 * 1024
"""Below this, ext4's own journal and tables would take most of the space."""

MKFS_OPTIONS = ("-q", "-F", "-b", str(BLOCK_SIZE), "-m", "0")
"""-m 0: no blocks reserved for root; inside, nobody is root, and the quota is the user's to use."""
MKFS_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
"""Nothing is zeroed and nothing discarded: the holes of a new sparse file already read as zeros, so
mkfs writes only its metadata (a few milliseconds for any size)."""
JOURNAL_MIB = 16
"""The journal: a host that crashes leaves images that mount without an e2fsck on the start path.
mke2fs would make it 32 MiB at 1 GiB and 128 MiB at 16 GiB, all of it taken from the user's quota;
one user's metadata writes of a few seconds fit in 16 MiB. Images under 256 MiB keep mke2fs's
smaller one (4 MiB under 128 MiB)."""
RELEASE_TIMEOUT = 2.0
"""How long to wait for a loop device to be let go after its last unmount (see `_released`)."""
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard,noinit_itable"
"""loop: util-linux sets up the device with autoclear, so the last unmount frees it.
discard: what a user deletes is given back to the host (the image's holes grow again).
noinit_itable: no background thread zeroing inode tables that a sparse file already reads as zeros."""

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TIDY_ROOT = "rmdir lost+found\nsif / mode 040700\n"
"""lost+found is e2fsck's; it recreates it when it needs it. The root is the user's alone, as before."""


class WorkspaceError(RuntimeError):
    """A workspace operation failed; the message says why, in terms an admin can act on."""


class WorkspaceInUse(WorkspaceError):
    """The workspace is mounted (or still attached to a loop device) where it must not be."""


class Workspaces:
    def __init__(self, root: Path, *, uid: int, gid: int, quotas: bool | None = None):
        """Workspaces under `root`, owned inside by `uid`:`gid`.

        `quotas`: True for ext4 images, False for plain directories; None probes
        whether loop mounts work here and falls back to directories if not.
        """
        self.root = Path(root).absolute()
        self.uid, self.gid = uid, gid
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if quotas is None:
            reason = self.why_no_quotas()
            quotas = reason is None
            if reason is not None:
                log.warning("workspaces have no disk quota: %s; they are plain directories in %s", reason, self.root)
        self.quotas = quotas

    # -- workspaces ------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """Where the workspace `key` is kept: its image, or its directory without quotas."""
        if not _KEY.fullmatch(key):
            raise WorkspaceError(f"invalid workspace key {key!r}: letters, digits, '_', '.', '-' only")
        return self.root / (f"{key}.img" if self.quotas else key)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def keys(self) -> list[str]:
        """The keys of every workspace, sorted."""
        if self.quotas:
            found = (p.name.removesuffix(".img") for p in self.root.glob("*.img") if p.is_file())
        else:
            found = (p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(k for k in found if _KEY.fullmatch(k))

    def create(self, key: str, quota_bytes: int, *, seed_from: Path | None = None) -> bool:
        """Make the workspace `key` of `quota_bytes` (rounded up to 4 KiB, 16 MiB at least); False if it existed.

        Its root is owned by uid:gid, mode 0700, and empty, unless `seed_from`
        names a directory whose contents are copied in with their modes, owners,
        timestamps, hard links and extended attributes (a plain workspace of old
        being moved into an image). The workspace appears complete or not at all.
        """
        target = self.path(key)
        if target.exists():
            return False
        if seed_from is not None and not Path(seed_from).is_dir():
            raise WorkspaceError(f"cannot seed workspace {key} from {seed_from}: not a directory")
        partial = self.root / f".{key}.{secrets.token_hex(4)}.partial"
        try:
            if self.quotas:
                self._make_image(partial, _round_up(max(quota_bytes, MIN_QUOTA)), seed_from)
            else:
                self._make_directory(partial, seed_from)
            with self._namespace_lock():
                if target.exists():
                    return False
                partial.rename(target)
        finally:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        return True

    def _make_image(self, image: Path, size: int, seed_from: Path | None) -> None:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        extended = f"{MKFS_EXTENDED},root_owner={self.uid}:{self.gid}"
        seed = ["-d", str(seed_from)] if seed_from is not None else []
        journal = ["-J", f"size={JOURNAL_MIB}"] if size >= 256 * 1024 * 1024 else []
        result = _run("mkfs.ext4", *MKFS_OPTIONS, *journal, "-E", extended, *seed, str(image), check=False)
        if result.returncode != 0:
            detail = result.stderr.strip() or result.stdout.strip()
            if seed_from is not None and ("allocate" in detail or "space" in detail):
                raise WorkspaceError(f"{seed_from} does not fit in a workspace of {size} bytes: {detail}")
            raise WorkspaceError(f"mkfs.ext4 failed ({result.returncode}): {detail}")
        _tidy_root(image)

    def _make_directory(self, directory: Path, seed_from: Path | None) -> None:
        directory.mkdir(mode=0o700)
        if seed_from is not None:
            _run("cp", "-a", "--", f"{seed_from}/.", str(directory))
        os.chown(directory, self.uid, self.gid)
        os.chmod(directory, 0o700)

    def rename(self, old_key: str, new_key: str) -> None:
        """Give the workspace `old_key` the key `new_key`, mounted or not.

        A mounted image stays mounted, and open files stay open: the loop device
        holds the image's inode, not its name. For a sandbox started ahead of its
        user, whose fresh workspace becomes that user's when it is claimed.
        """
        old, new = self.path(old_key), self.path(new_key)
        with self._namespace_lock():
            if not old.exists():
                raise WorkspaceError(f"there is no workspace {old_key}")
            if new.exists():
                raise WorkspaceError(f"cannot rename workspace {old_key} to {new_key}: {new_key} exists")
            old.rename(new)

    def delete(self, key: str) -> bool:
        """Unmount (here) and delete the workspace `key` with its data; False if there was none.

        Refused while it is still attached elsewhere (a sandbox's gofer that is
        still alive): its space would come back only once that ends.
        """
        target = self.path(key)
        with self._namespace_lock():
            if not target.exists():
                return False
            with self._image_lock(target):
                if (at := self.mounted(key)) is not None:
                    self.unmount(at)
                if self.quotas and (loop := self._attached(target)) is not None:
                    raise WorkspaceInUse(f"workspace {key} is still in use ({loop.name}); stop its sandbox first")
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        return True

    # -- mounts ----------------------------------------------------------------------------

    def mount(self, key: str, at: Path) -> None:
        """Mount the workspace `key` at `at` (made if missing, 0700 root), nosuid and nodev.

        Refused if the image is mounted or attached anywhere already: one ext4 image
        behind two loop devices is two kernels' worth of caches writing the same
        blocks, which corrupts it. Refused too if `at` holds files: they would be
        hidden under the mount (an old plain workspace: seed an image from it first).
        """
        target = self.path(key)
        at = Path(at).absolute()
        if not target.exists():
            raise WorkspaceError(f"there is no workspace {key}")
        at.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._image_lock(target):
            if self.quotas and (loop := self._attached(target)) is not None:
                where = next((m.mountpoint for m in hostmounts.mounts() if m.device == loop.device), None)
                if where is None:  # no mount here: which other mount namespace still has one
                    held = hostmounts.holders(loop.device)
                    elsewhere = f"{loop.name}, mounted by {', '.join(held)}" if held else f"{loop.name}, being released"
                else:
                    elsewhere = f"mounted at {where}"
                raise WorkspaceInUse(f"workspace {key} is in use ({elsewhere})")
            if not self.quotas and (where := self.mounted(key)) is not None:
                raise WorkspaceInUse(f"workspace {key} is in use (mounted at {where})")
            if hostmounts.mount_at(at) is not None:
                raise WorkspaceInUse(f"{at} is a mountpoint already")
            if any(at.iterdir()):
                raise WorkspaceError(f"cannot mount workspace {key} at {at}: that directory is not empty")
            if self.quotas:
                blocks, _, block_size = _superblock(target)
                if target.stat().st_size > blocks * block_size:
                    log.info("growing workspace %s to its new quota before mounting it", key)
                    _grow_offline(target)
                _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(target), str(at))
            else:
                _run("mount", "--bind", "-o", "nosuid,nodev", str(target), str(at))

    def unmount(self, at: Path) -> bool:
        """Unmount whatever is mounted at `at`; False if nothing was.

        If something on the host still uses it (a process with a file open or its
        cwd inside), the unmount is lazy: the mountpoint is free at once and the
        filesystem, with its loop device, is let go when the last user lets go.
        Until then `mount` refuses the image, which is what keeps it safe.
        Unmount only after the sandbox's gofer is gone: runsc bind-mounts the
        workspace into the gofer's own mount namespace, which keeps the image
        attached (and the sandbox using it) as long as the gofer lives; this then
        waits RELEASE_TIMEOUT for a loop device that will not be freed.
        """
        at = Path(at).absolute()
        if (mount := hostmounts.mount_at(at)) is None:
            return False
        result = _run("umount", str(at), check=False)
        if result.returncode != 0 and hostmounts.mount_at(at) is not None:
            log.warning("unmounting %s lazily: %s", at, result.stderr.strip())
            _run("umount", "--lazy", str(at))
        elif mount.source.startswith("/dev/loop") and not any(m.source == mount.source for m in hostmounts.mounts()):
            _released(mount.source)  # so that a `mount` right after this one finds the image free
        return True

    def mounted(self, key: str) -> Path | None:
        """Where the workspace `key` is mounted in this mount namespace, or None."""
        target = self.path(key)
        try:
            st = target.stat()
        except FileNotFoundError:
            return None
        mounts = hostmounts.mounts()
        if self.quotas:
            loop = self._loop_of(target, st)
            return next((m.mountpoint for m in mounts if loop and m.device == loop.device), None)
        device = hostmounts.majmin(st.st_dev)
        for m in mounts:
            if m.device == device and m.mountpoint != target and _same_file(m.mountpoint, st):
                return m.mountpoint
        return None

    def cleanup(self, under: Path, keep: set[Path]) -> int:
        """Unmount every workspace mounted under `under` but not at one of `keep`; returns how many.

        For a gateway starting after a crash: mounts outlive the process that made
        them. Run it after the strays' runsc processes are killed, so the loop
        devices are freed as their mounts go.
        """
        under = Path(under).absolute()
        keep = {Path(p).absolute() for p in keep}
        mounts = [m for m in hostmounts.mounts() if m.mountpoint.is_relative_to(under) and m.mountpoint not in keep]
        ours: list[Path] = []
        if self.quotas:
            images = set()
            for image in self.root.glob("*.img"):
                with contextlib.suppress(FileNotFoundError):
                    st = image.stat()
                    images.add((hostmounts.majmin(st.st_dev), st.st_ino))
            devices = {loop.device for loop in hostmounts.loops() if loop.backing in images}
            ours = [m.mountpoint for m in mounts if m.device in devices]
        else:
            directories = [p.stat() for p in self.root.iterdir() if p.is_dir()]
            ours = [m.mountpoint for m in mounts if any(_same_file(m.mountpoint, st) for st in directories)]
        for mountpoint in sorted(set(ours), key=lambda p: len(p.parts), reverse=True):
            log.info("unmounting stray workspace at %s", mountpoint)
            self.unmount(mountpoint)
        return len(set(ours))

    # -- quotas ----------------------------------------------------------------------------

    def usage(self, key: str) -> tuple[int, int | None]:
        """(used bytes, quota bytes) of the workspace `key`; the quota is None without quotas.

        ext4's own journal and tables count as used: a new workspace of 1 GiB
        starts with about 2% used, and at ENOSPC, used equals the quota.
        """
        target = self.path(key)
        if not target.exists():
            raise WorkspaceError(f"there is no workspace {key}")
        if not self.quotas:
            out = _run("du", "-s", "-x", "-B1", str(target)).stdout
            return int(out.split()[0]), None
        blocks, free, block_size = _superblock(target)
        quota = blocks * block_size  # not the file's size: a growth may wait for the next mount
        if (at := self.mounted(key)) is not None:
            st = os.statvfs(at)
            return quota - st.f_bfree * st.f_frsize, quota
        return quota - free * block_size, quota

    def resize(self, key: str, quota_bytes: int) -> bool:
        """Make the quota of `key` `quota_bytes` (rounded up to 4 KiB); True once it is in force.

        Growing works mounted (online, with resize2fs) or not. The kernel grows a
        mounted ext4 only for a process with CAP_SYS_RESOURCE; without it, this
        returns False and the new quota comes into force at the next `mount`.
        Shrinking works only unmounted, and only if the data fits; otherwise a
        WorkspaceError says why. Without quotas there is nothing to do: True.
        """
        if not self.quotas:
            return True
        target = self.path(key)
        size = _round_up(max(quota_bytes, MIN_QUOTA))
        with self._image_lock(target):
            current = target.stat().st_size
            blocks, _, block_size = _superblock(target)
            loop = self._attached(target)
            if size == current == blocks * block_size:
                return True
            if size < current and loop is not None:
                raise WorkspaceInUse(f"cannot shrink workspace {key} while it is mounted; stop its sandbox first")
            if loop is not None:
                os.truncate(target, size)
                _run("losetup", "--set-capacity", loop.name)
                grown = _run("resize2fs", loop.name, check=False)
                if grown.returncode == 0:
                    return True
                if "Permission denied" not in grown.stderr:
                    raise WorkspaceError(f"resize2fs failed ({grown.returncode}): {grown.stderr.strip()}")
                log.warning("workspace %s grows at its next mount: online growth needs CAP_SYS_RESOURCE", key)
                return False
            if size > current:
                os.truncate(target, size)
                _grow_offline(target)
                return True
            _check(target)
            minimum = int(_run("resize2fs", "-P", str(target)).stdout.split(":")[-1]) * block_size
            if minimum > size:
                raise WorkspaceError(f"cannot shrink workspace {key} to {size} bytes: it needs at least {minimum} bytes")
            _run("resize2fs", str(target), str(size // block_size))
            os.truncate(target, size)
            _tidy_root(target)
            return True

    # -- internals -------------------------------------------------------------------------

    def _loop_of(self, image: Path, st: os.stat_result | None = None) -> hostmounts.Loop | None:
        """The loop device the image is attached to, found by inode: it survives renames."""
        st = st or image.stat()
        backing = (hostmounts.majmin(st.st_dev), st.st_ino)
        return next((loop for loop in hostmounts.loops() if loop.backing == backing), None)

    def _attached(self, image: Path) -> hostmounts.Loop | None:
        """The image's loop device, unless it is only lingering after its last unmount (waited for)."""
        loop = self._loop_of(image)
        if loop is None or any(m.device == loop.device for m in hostmounts.mounts()) or not _released(loop.name):
            return loop
        return self._loop_of(image)

    @contextlib.contextmanager
    def _namespace_lock(self) -> Iterator[None]:
        """Serializes what adds, renames or removes names in root, across threads and processes."""
        with _flock(self.root / ".lock", create=True):
            yield

    @contextlib.contextmanager
    def _image_lock(self, target: Path) -> Iterator[None]:
        """Serializes what attaches or resizes one image: a check and a mount must not interleave."""
        try:
            with _flock(target):
                yield
        except FileNotFoundError:
            raise WorkspaceError(f"there is no workspace {target.name}") from None

    def why_no_quotas(self) -> str | None:
        """Why workspaces here cannot be quota-bound loop-mounted images (None: they can), by trying one."""
        if os.geteuid() != 0:
            return "loop mounts need root"
        missing = [t for t in ("mkfs.ext4", "debugfs", "resize2fs", "e2fsck", "losetup") if not shutil.which(t)]
        if missing:
            return f"{', '.join(missing)} not found (e2fsprogs; scripts/setup.sh installs it)"
        probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=self.root))
        try:
            image, at = probe / "probe.img", probe / "mnt"
            self._make_image(image, MIN_QUOTA, None)
            at.mkdir()
            _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(at))
            self.unmount(at)
        except (WorkspaceError, OSError) as exc:
            return f"a loop mount failed here ({exc})"
        finally:
            if hostmounts.mount_at(probe / "mnt") is None:
                shutil.rmtree(probe, ignore_errors=True)
        return None


def _round_up(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def _run(*argv: str, check: bool = True, input: str = "") -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError:
        raise WorkspaceError(f"{argv[0]} is not installed") from None
    if check and result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise WorkspaceError(f"{argv[0]} failed ({result.returncode}): {detail}")
    return result


def _tidy_root(image: Path) -> None:
    _run("debugfs", "-w", "-f", "-", str(image), input=_TIDY_ROOT)


def _released(loop: str, timeout: float = RELEASE_TIMEOUT) -> bool:
    """Wait for the loop device to be detached; False if it still is after `timeout`.

    autoclear detaches a loop device in a kernel work item after its last close,
    so for a few milliseconds after `umount` returns (and after a sandbox's gofer,
    the last holder of its mount namespace, exits) the image is still attached.
    """
    bound = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
    deadline = time.monotonic() + timeout
    while bound.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _check(image: Path) -> None:
    """e2fsck, which offline resize2fs insists on; it brings back lost+found, which _tidy_root removes again."""
    checked = _run("e2fsck", "-f", "-p", str(image), check=False)
    if checked.returncode not in (0, 1):  # 1: errors fixed
        raise WorkspaceError(f"{image.name} needs repair (e2fsck {checked.returncode}): {checked.stdout.strip()}")


def _grow_offline(image: Path) -> None:
    """Grow the filesystem of an unmounted image to the size of its file."""
    _check(image)
    _run("resize2fs", str(image))
    _tidy_root(image)


def _superblock(image: Path) -> tuple[int, int, int]:
    """(block count, free blocks, block size) from an image's ext4 superblock.

    Read directly: it is on every mount's path, where a dumpe2fs would cost more
    than the mount. The free count is current only while the image is unmounted.
    """
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    blocks, free, log_size, magic, incompat = (
        struct.unpack_from("<I", sb, 0x04)[0],
        struct.unpack_from("<I", sb, 0x0C)[0],
        struct.unpack_from("<I", sb, 0x18)[0],
        struct.unpack_from("<H", sb, 0x38)[0],
        struct.unpack_from("<I", sb, 0x60)[0],
    )
    if magic != 0xEF53:
        raise WorkspaceError(f"{image.name} holds no ext4 filesystem")
    if incompat & 0x80:  # 64bit: the counts have high halves
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        free |= struct.unpack_from("<I", sb, 0x158)[0] << 32
    return blocks, free, 1024 << log_size


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        other = path.stat()
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def _flock(path: Path, *, create: bool = False) -> Iterator[None]:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
