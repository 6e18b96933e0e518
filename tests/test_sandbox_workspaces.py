"""Workspaces with a disk quota, for real: sparse ext4 images, loop mounts, a user filling the disk.

Every test works in a directory of its own under /tmp and, pass or fail,
leaves no mount and no loop device behind (the `tmp` fixture sees to it
without relying on the code under test).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sandbox.workspaces import WorkspaceError, WorkspaceInUse, Workspaces

UID = GID = 1000
MiB = 1024 * 1024
QUOTA = 32 * MiB

loop_mounts_work = (
    os.geteuid() == 0 and Path("/dev/loop-control").exists() and shutil.which("mkfs.ext4") is not None
)
needs_loops = pytest.mark.skipif(not loop_mounts_work, reason="needs root, loop devices and e2fsprogs")


@pytest.fixture
def tmp():
    directory = Path(tempfile.mkdtemp(prefix="ws-", dir="/tmp"))
    directory.chmod(0o711)  # the sandbox user, run on the host here, must get through to the mountpoints
    try:
        yield directory
    finally:
        _unmount_all_under(directory)
        for loop in _loops_under(directory):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        assert not _mounts_under(directory), "a mount survived the test"
        shutil.rmtree(directory)


@pytest.fixture
def workspaces(tmp):
    return Workspaces(tmp / "images", uid=UID, gid=GID, quotas=True)


def _mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if Path(p).is_relative_to(directory)]


def _unmount_all_under(directory: Path) -> None:
    for _ in range(3):  # stacked mounts come off one at a time
        for point in sorted(_mounts_under(directory), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)


def _loops_under(directory: Path) -> list[str]:
    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True, check=True).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices if Path(d["back-file"].removesuffix(" (deleted)")).is_relative_to(directory)]


def as_user(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the sandbox user, as the servers inside would."""
    return subprocess.run(
        ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def fill(directory: Path, name: str = "fill") -> subprocess.CompletedProcess[str]:
    return as_user("dd", "if=/dev/zero", f"of={directory / name}", "bs=1M", "status=none")


CAP_SYS_RESOURCE = 24


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> bit & 1)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def free_bytes(at: Path) -> int:
    st = os.statvfs(at)
    return st.f_bavail * st.f_frsize


def mount_options(at: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        [line] = [line for line in f if line.split()[4] == str(at)]
    return set(line.split()[5].split(","))


@needs_loops
def test_a_workspace_belongs_to_the_sandbox_user_alone(workspaces, tmp):
    assert workspaces.create("alice", QUOTA) is True
    assert workspaces.create("alice", QUOTA) is False  # already there: left as it is
    assert workspaces.exists("alice") and not workspaces.exists("bob")
    assert workspaces.keys() == ["alice"]
    at = tmp / "mnt" / "alice"
    workspaces.mount("alice", at)
    assert workspaces.mounted("alice") == at
    st = at.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID, GID, 0o700)
    assert os.listdir(at) == []  # no lost+found
    assert {"nosuid", "nodev"} <= mount_options(at)
    wrote = as_user("sh", "-c", f"echo mine > {at}/note")
    assert wrote.returncode == 0, wrote.stderr

    assert workspaces.unmount(at) is True
    assert workspaces.unmount(at) is False
    assert workspaces.mounted("alice") is None and os.listdir(at) == []
    assert _loops_under(tmp) == []  # autoclear: unmounting freed the loop device
    workspaces.mount("alice", at)
    assert (at / "note").read_text() == "mine\n"
    workspaces.unmount(at)


@needs_loops
def test_a_disk_filler_gets_enospc_at_its_quota_and_hurts_nobody_else(workspaces, tmp):
    for key in ("filler", "neighbour"):
        workspaces.create(key, QUOTA)
        workspaces.mount(key, tmp / key)
    images = [workspaces.path("filler"), workspaces.path("neighbour")]
    before = sum(allocated(p) for p in images)
    free = free_bytes(tmp / "filler")
    assert free > QUOTA * 3 // 4  # ext4's journal and tables take the rest

    filled = fill(tmp / "filler")
    assert filled.returncode != 0 and "No space left on device" in filled.stderr
    assert free - MiB <= (tmp / "filler" / "fill").stat().st_size <= free
    used, quota = workspaces.usage("filler")
    assert quota == QUOTA and used > QUOTA - MiB
    os.sync()
    # The host gave the filler about its quota, no more.
    assert sum(allocated(p) for p in images) - before <= QUOTA

    neighbour = as_user("dd", "if=/dev/zero", f"of={tmp / 'neighbour' / 'data'}", "bs=1M", "count=8", "status=none")
    assert neighbour.returncode == 0, neighbour.stderr

    # What the filler deletes goes back to the host (mounted with discard).
    filler_image = workspaces.path("filler")
    full = allocated(filler_image)
    (tmp / "filler" / "fill").unlink()
    os.sync()
    assert allocated(filler_image) < full - QUOTA // 2
    for key in ("filler", "neighbour"):
        workspaces.unmount(tmp / key)


@needs_loops
def test_renaming_a_mounted_workspace_keeps_its_open_files(workspaces, tmp):
    workspaces.create("pool-1", QUOTA)
    workspaces.create("taken", QUOTA)
    at = tmp / "sbx"
    workspaces.mount("pool-1", at)
    with open(at / "log", "w") as f:
        f.write("before ")
        f.flush()
        workspaces.rename("pool-1", "carol")
        f.write("after")
    assert workspaces.mounted("carol") == at
    assert workspaces.mounted("pool-1") is None and not workspaces.exists("pool-1")
    assert (at / "log").read_text() == "before after"
    with pytest.raises(WorkspaceError, match="exists"):
        workspaces.rename("carol", "taken")
    with pytest.raises(WorkspaceError, match="no workspace"):
        workspaces.rename("pool-1", "dave")
    with pytest.raises(WorkspaceInUse):
        workspaces.mount("carol", tmp / "elsewhere")  # the loop device followed the rename
    workspaces.unmount(at)
    workspaces.mount("carol", tmp / "again")
    assert (tmp / "again" / "log").read_text() == "before after"
    workspaces.unmount(tmp / "again")


@needs_loops
def test_resize_grows_online_and_shrinks_only_offline_when_the_data_fits(workspaces, tmp):
    workspaces.create("grow", QUOTA)
    at = tmp / "grow"
    workspaces.mount("grow", at)
    assert fill(at, "first").returncode != 0
    if workspaces.resize("grow", 2 * QUOTA) is False:
        # The kernel grows a mounted ext4 only for CAP_SYS_RESOURCE: the growth waits for the next mount.
        assert not has_capability(CAP_SYS_RESOURCE)
        assert workspaces.usage("grow")[1] == QUOTA and free_bytes(at) < MiB
        workspaces.unmount(at)
        workspaces.mount("grow", at)
    assert workspaces.usage("grow")[1] == 2 * QUOTA
    assert free_bytes(at) > QUOTA - MiB
    more = as_user("dd", "if=/dev/zero", f"of={at / 'second'}", "bs=1M", "count=16", "status=none")
    assert more.returncode == 0, more.stderr

    with pytest.raises(WorkspaceInUse, match="shrink"):
        workspaces.resize("grow", QUOTA)
    workspaces.unmount(at)
    with pytest.raises(WorkspaceError, match="needs at least"):
        workspaces.resize("grow", QUOTA)
    assert workspaces.usage("grow")[1] == 2 * QUOTA  # a refused shrink changes nothing

    workspaces.mount("grow", at)
    (at / "first").unlink()
    workspaces.unmount(at)
    workspaces.resize("grow", QUOTA)
    assert workspaces.path("grow").stat().st_size == QUOTA
    workspaces.resize("grow", 3 * QUOTA)  # offline growth too
    workspaces.mount("grow", at)
    assert sorted(os.listdir(at)) == ["second"]  # no lost+found back from e2fsck
    assert (at / "second").stat().st_size == 16 * MiB
    assert at.stat().st_mode & 0o7777 == 0o700
    workspaces.unmount(at)


@needs_loops
def test_seed_from_moves_an_old_workspace_in_as_it_was(workspaces, tmp):
    old = tmp / "old"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "data").write_text("data")
    os.chmod(old / "sub" / "data", 0o640)
    os.chown(old / "sub" / "data", UID, GID)
    (old / "other-owner").write_text("x")
    os.chown(old / "other-owner", 1234, 99)
    os.link(old / "sub" / "data", old / "hardlink")
    (old / "symlink").symlink_to("sub/data")
    os.mkfifo(old / "fifo")
    os.chmod(old / "sub", 0o750)
    os.utime(old / "sub" / "data", (1_000_000_000, 1_000_000_000))

    assert workspaces.create("seeded", QUOTA, seed_from=old)
    at = tmp / "seeded"
    workspaces.mount("seeded", at)
    assert sorted(os.listdir(at)) == sorted(os.listdir(old))
    for name in ("sub", "sub/data", "other-owner", "hardlink", "symlink", "fifo"):
        a, b = os.lstat(old / name), os.lstat(at / name)
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_size) == (b.st_mode, b.st_uid, b.st_gid, b.st_size), name
    assert os.stat(at / "sub" / "data").st_mtime == 1_000_000_000
    assert os.stat(at / "hardlink").st_ino == os.stat(at / "sub" / "data").st_ino
    assert os.readlink(at / "symlink") == "sub/data"
    assert (at / "sub" / "data").read_text() == "data"
    st = at.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID, GID, 0o700)
    workspaces.unmount(at)

    (old / "big").write_bytes(os.urandom(QUOTA))
    with pytest.raises(WorkspaceError, match="does not fit"):
        workspaces.create("too-big", QUOTA, seed_from=old)
    assert not workspaces.exists("too-big")
    assert sorted(p.name for p in workspaces.root.iterdir()) == [".lock", "seeded.img"]  # no partial left


@needs_loops
def test_mount_refuses_what_would_corrupt_or_hide_data(workspaces, tmp):
    workspaces.create("once", QUOTA)
    workspaces.mount("once", tmp / "a")
    with pytest.raises(WorkspaceInUse, match=f"mounted at {tmp / 'a'}"):
        workspaces.mount("once", tmp / "b")
    workspaces.unmount(tmp / "a")

    # Attached behind our back (as a sandbox's gofer would keep it): refused as well.
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(workspaces.path("once"))], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with pytest.raises(WorkspaceInUse, match=loop):
            workspaces.mount("once", tmp / "b")
        with pytest.raises(WorkspaceInUse):
            workspaces.delete("once")
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)

    (tmp / "full").mkdir()
    (tmp / "full" / "old-file").write_text("would be hidden")
    with pytest.raises(WorkspaceError, match="not empty"):
        workspaces.mount("once", tmp / "full")
    with pytest.raises(WorkspaceError, match="no workspace"):
        workspaces.mount("nobody", tmp / "c")
    with pytest.raises(WorkspaceError, match="invalid"):
        workspaces.create("../escape", QUOTA)


@needs_loops
def test_cleanup_unmounts_stray_workspaces_and_frees_their_loop_devices(workspaces, tmp):
    under = tmp / "workspaces"
    for key in ("kept", "stray-1", "stray-2"):
        workspaces.create(key, QUOTA)
        workspaces.mount(key, under / key)
    (under / "not-ours").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(under / "not-ours")], check=True)
    assert len(_loops_under(tmp)) == 3

    assert workspaces.cleanup(under, keep={under / "kept"}) == 2
    assert workspaces.mounted("kept") == under / "kept"
    assert workspaces.mounted("stray-1") is None and workspaces.mounted("stray-2") is None
    assert under / "not-ours" in {Path(p) for p in _mounts_under(tmp)}
    assert len(_loops_under(tmp)) == 1
    assert workspaces.cleanup(under, keep=set()) == 1
    assert _loops_under(tmp) == []  # `losetup -a` shows none of ours
    subprocess.run(["umount", str(under / "not-ours")], check=True)


@needs_loops
def test_delete_unmounts_first(workspaces, tmp):
    workspaces.create("gone", QUOTA)
    workspaces.mount("gone", tmp / "gone")
    assert workspaces.delete("gone") is True
    assert workspaces.delete("gone") is False
    assert not workspaces.exists("gone") and workspaces.keys() == []
    assert _mounts_under(tmp) == [] and _loops_under(tmp) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_without_quotas_workspaces_are_directories_behind_the_same_api(tmp):
    workspaces = Workspaces(tmp / "dirs", uid=UID, gid=GID, quotas=False)
    seed = tmp / "seed"
    seed.mkdir()
    (seed / "kept").write_text("kept")
    os.chown(seed / "kept", 1234, 99)
    assert workspaces.create("pool-9", QUOTA, seed_from=seed) is True
    assert workspaces.create("pool-9", QUOTA) is False
    assert workspaces.keys() == ["pool-9"] and workspaces.path("pool-9").is_dir()
    at = tmp / "mnt"
    workspaces.mount("pool-9", at)
    assert workspaces.mounted("pool-9") == at
    assert {"nosuid", "nodev"} <= mount_options(at)
    st = at.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID, GID, 0o700)
    assert (at / "kept").stat().st_uid == 1234
    assert as_user("sh", "-c", f"echo mine > {at}/note").returncode == 0
    with pytest.raises(WorkspaceInUse):
        workspaces.mount("pool-9", tmp / "twice")

    with open(at / "log", "w") as f:
        f.write("a")
        workspaces.rename("pool-9", "erin")
        f.write("b")
    assert workspaces.mounted("erin") == at and (at / "log").read_text() == "ab"
    used, quota = workspaces.usage("erin")
    assert quota is None and used > 0
    workspaces.resize("erin", 2 * QUOTA)  # nothing to enforce: accepted, as with images
    assert workspaces.cleanup(tmp, keep=set()) == 1
    assert workspaces.mounted("erin") is None
    assert (workspaces.path("erin") / "note").read_text() == "mine\n"
    workspaces.mount("erin", at)
    assert workspaces.delete("erin") is True and _mounts_under(tmp) == []


def test_the_probe_falls_back_to_directories_where_loop_mounts_fail(tmp, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp / "empty"))  # no mkfs.ext4, as on a machine without e2fsprogs
    workspaces = Workspaces(tmp / "probe", uid=UID, gid=GID)
    assert workspaces.quotas is False
    assert "no disk quota" in caplog.text
    assert list((tmp / "probe").iterdir()) == []


@needs_loops
def test_the_probe_finds_loop_mounts_here(tmp):
    assert Workspaces(tmp / "probe", uid=UID, gid=GID).quotas is True
    assert list((tmp / "probe").iterdir()) == []
    assert _loops_under(tmp) == []


@needs_loops
def test_create_and_mount_are_fast_enough_for_a_sandbox_start(workspaces, tmp):
    creates, mounts, unmounts = [], [], []
    for i in range(10):
        started = time.perf_counter()
        workspaces.create(f"t{i}", 1024 * MiB)
        creates.append(time.perf_counter() - started)
        started = time.perf_counter()
        workspaces.mount(f"t{i}", tmp / "t")
        mounts.append(time.perf_counter() - started)
        started = time.perf_counter()
        workspaces.unmount(tmp / "t")
        unmounts.append(time.perf_counter() - started)
    median = {name: statistics.median(t) * 1000 for name, t in [("create", creates), ("mount", mounts), ("unmount", unmounts)]}
    print("\nworkspace of 1 GiB, median of 10: " + ", ".join(f"{k} {v:.1f} ms" for k, v in median.items()))
    assert all(v < 500 for v in median.values()), median
    assert allocated(workspaces.path("t0")) < 32 * MiB  # sparse: 1 GiB of quota, little of the host


@needs_loops
@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")
async def test_a_gvisor_sandbox_writes_into_the_image_and_sees_enospc(tmp):
    from sandbox.backends.base import SandboxSpec
    from sandbox.backends.runsc import RunscBackend
    from sandbox.limits import Limits
    from sandbox.supervisor.config import SupervisorConfig

    workspaces = Workspaces(tmp / "images", uid=UID, gid=GID, quotas=True)
    workspaces.create("inside", QUOTA)
    workspace = tmp / "workspace"
    workspaces.mount("inside", workspace)
    backend = RunscBackend(tmp / "runsc", cgroup_parent="/mcpfleet-test")
    sandbox_id = f"sbx-ws{secrets.token_hex(4)}"
    directory = tmp / "sandboxes" / sandbox_id
    channel = directory / "channel"
    channel.mkdir(parents=True)
    os.chown(channel, UID, GID)
    SupervisorConfig(socket="/run/mcpfleet/gateway.sock", servers=[]).write(
        channel / "supervisor.json", owner=(UID, GID)
    )
    free = free_bytes(workspace)

    try:
        await backend.start(SandboxSpec(sandbox_id, directory, workspace, channel, Limits(), UID, GID))
        _, filled = await backend.run_inside(sandbox_id, "echo from-inside > /workspace/note; dd if=/dev/zero of=/workspace/fill bs=1M", (UID, GID))
        assert "No space left on device" in filled, filled
        assert (workspace / "note").read_text() == "from-inside\n"
        assert (workspace / "note").stat().st_uid == UID
        assert free - MiB <= (workspace / "fill").stat().st_size <= free

        # Unmounted on the host too early, the workspace stays the sandbox's: runsc's gofer holds its own
        # mount of it, and with it the loop device, which is why a second mount must wait for the gofer.
        workspaces.unmount(workspace)
        assert await backend.run_inside(sandbox_id, "cat /workspace/note", (UID, GID)) == (0, "from-inside")
        with pytest.raises(WorkspaceInUse, match=r"mounted by pid \d+ \(runsc-gofer\)"):
            workspaces.mount("inside", tmp / "again")
    finally:
        await backend.destroy(sandbox_id)
    workspaces.mount("inside", tmp / "again")  # the gofer is gone, and the image with it
    assert (tmp / "again" / "note").read_text() == "from-inside\n"
    workspaces.unmount(tmp / "again")
    assert _loops_under(tmp) == []
